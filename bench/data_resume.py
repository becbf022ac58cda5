"""The resume part of bench/data_bench.py: time to the first batch at a start step against sequential skips."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

from data_common import FMT, print_table, setup, timed, write_big_file


def skip_lines(path: Path, count: int) -> float:
    """Read and discard `count` lines: the least any sequential reader pays to reach record `count`."""
    started = time.perf_counter()
    with path.open("rb", buffering=1024 * 1024) as fh:
        deque(itertools.islice(fh, count), maxlen=0)
    return time.perf_counter() - started


def skip_json(path: Path, count: int) -> float:
    """Read and JSON-decode `count` lines (a JSONL stream decodes each record it skips)."""
    started = time.perf_counter()
    with path.open("rb", buffering=1024 * 1024) as fh:
        for line in itertools.islice(fh, count):
            json.loads(line)
    return time.perf_counter() - started


def replay_rate(path: Path, tokenizer: Any, cfg: Any, count: int) -> float:
    """Records/s of read + parse + tokenise: what replaying skipped batches through the pipeline costs."""
    from dstrain.data.batches import tokenize_record
    from dstrain.data.records import parse_text

    started = time.perf_counter()
    with path.open("rb") as fh:
        for line in itertools.islice(fh, count):
            tokenize_record(tokenizer, parse_text(line.decode("utf-8"), FMT), cfg)
    return count / (time.perf_counter() - started)


def first_batch_at(dataset: Any, plan: Any, step: int, total: int, pad_id: int, seed: int) -> float:
    """Seconds from constructing train_loader(start_step=step) to its first MicroBatch (no workers)."""
    from dstrain.data.loader import LoaderOptions, train_loader

    started = time.perf_counter()
    loader = train_loader(dataset, plan, LoaderOptions(pad_id=pad_id, seed=seed), 0, total, start_step=step)
    next(iter(loader))
    return time.perf_counter() - started


def bench_resume(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dstrain.config.zero import BatchPlan
    from dstrain.data.index import index_file
    from dstrain.data.loader import TokenizedCorpus, steps_per_epoch
    from dstrain.data.stream import Corpus

    tokenizer, cfg = setup()
    path = work / "big.jsonl"
    try:
        write_s, (size, lines) = timed(
            lambda: write_big_file(path, int(args.resume_gb * 1e9), args.distinct, args.seed)
        )
        print(f"resume: wrote {size / 1e9:.2f} GB, {lines:,} records in {write_s:.1f} s", flush=True)
        cold_s, index = timed(lambda: index_file(path, FMT))
        warm = [timed(lambda: index_file(path, FMT))[0] for _ in range(args.repeats)]
        print(f"  index cold {cold_s:.1f} s, warm {statistics.median(warm) * 1e3:.1f} ms", flush=True)
        dataset = TokenizedCorpus(Corpus([index]), tokenizer, cfg)
        plan = BatchPlan(args.resume_micro, args.resume_accum, 1)
        per_epoch = steps_per_epoch(len(dataset), plan)
        rate = replay_rate(path, tokenizer, cfg, args.replay_sample)
        rows, positions = [], []
        for fraction in (0.0, 0.1, 0.5, 0.9):
            step = int(per_epoch * fraction)
            skipped = step * plan.global_batch
            first = [
                first_batch_at(dataset, plan, step, per_epoch, tokenizer.pad_token_id, args.seed)
                for _ in range(args.repeats)
            ]
            lines_s = skip_lines(path, skipped) if skipped else 0.0
            measure_json = fraction <= args.json_measure_upto
            json_s = (skip_json(path, skipped) if skipped else 0.0) if measure_json else None
            positions.append(
                {
                    "fraction": fraction,
                    "step": step,
                    "records_before": skipped,
                    "dstrain_first_batch_s": statistics.median(first),
                    "dstrain_first_batch_all_s": first,
                    "skip_lines_s": lines_s,
                    "skip_json_s": json_s,
                    "replay_tokenize_s_extrapolated": skipped / rate,
                }
            )
            print(f"  {json.dumps(positions[-1])}", flush=True)
        # JSON decoding skip beyond what was measured: linear in records from the last measured position
        measured = [p for p in positions if p["skip_json_s"] is not None and p["records_before"]]
        per_record = measured[-1]["skip_json_s"] / measured[-1]["records_before"] if measured else None
        for p in positions:
            p["skip_json_extrapolated"] = p["skip_json_s"] is None and per_record is not None
            if p["skip_json_extrapolated"]:
                p["skip_json_s"] = p["records_before"] * per_record
            first_ms = p["dstrain_first_batch_s"] * 1e3
            json_cell = f"{p['skip_json_s']:.2f}" + (" (extrap.)" if p["skip_json_extrapolated"] else "")
            rows.append(
                [
                    f"{p['fraction']:.0%}",
                    f"{p['step']:,}",
                    f"{p['records_before']:,}",
                    f"{first_ms:.1f}",
                    f"{p['skip_lines_s']:.2f}",
                    json_cell,
                    f"{p['replay_tokenize_s_extrapolated']:,.0f}"
                    + (" (extrap.)" if p["records_before"] else ""),
                ]
            )
        print_table(
            f"Resume: {size / 1e9:.2f} GB, {len(dataset):,} records, micro {plan.micro} x accumulation "
            f"{plan.accumulation} (global {plan.global_batch}), {per_epoch:,} steps/epoch; dstrain = median "
            f"of {args.repeats}; replay at {rate:,.0f} records/s measured on {args.replay_sample} records",
            [
                "position",
                "start step",
                "records before",
                "dstrain first batch ms",
                "skip lines s",
                "skip + json.loads s",
                "replay + tokenise s",
            ],
            rows,
        )
        print(
            f"\nIndex: cold build {cold_s:.1f} s ({size / 1e6 / cold_s:,.0f} MB/s, {len(index):,} records, "
            f"workers {min(8, os.cpu_count() or 1)}), warm cached load {statistics.median(warm) * 1e3:.1f} ms"
        )
        return {
            "file_bytes": size,
            "records": len(index),
            "write_s": write_s,
            "index_cold_s": cold_s,
            "index_cold_mb_per_s": size / 1e6 / cold_s,
            "index_warm_s": statistics.median(warm),
            "index_warm_all_s": warm,
            "plan": {"micro": plan.micro, "accumulation": plan.accumulation, "world": plan.world},
            "steps_per_epoch": per_epoch,
            "replay_records_per_s": rate,
            "positions": positions,
        }
    finally:
        path.unlink(missing_ok=True)
