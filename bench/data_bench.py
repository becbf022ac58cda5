"""Data pipeline benchmark: dstrain's streaming pipeline (cached per-file index, pread access, seekable epoch
order, packing) against the Hugging Face `datasets` route, on generated sft-rag data.

Run (from any directory; scratch files go to --work, by default a temp dir removed after; the 1 GB file always is):
    python bench/data_bench.py                       # all three parts, about 5 minutes on 2 CPU cores
    python bench/data_bench.py --part throughput --records 20000 --repeats 3
    python bench/data_bench.py --part resume --resume-gb 1.0
    python bench/data_bench.py --part packing --out results.json

Parts:
  throughput  N generated records (3-5 passages of 40-80 random vocabulary words, a query, an answer) in one
              JSONL file. Both sides run the same tokenisation (dstrain's `tokenize_record` on
              `parse_record(row)`), max_seq_len 512, max_passage_tokens 384:
                datasets   load_dataset("json", cache_dir=<fresh>) + .map(tokenize) (+ num_proc=2), then every
                           row iterated in file order (its cheapest order), summing len(input_ids)
                dstrain    index_file (cold, validating) + train_loader over one shuffled epoch (micro batches
                           padded into tensors), num_workers 0 and 2, summing MicroBatch.tokens
              Reported: tokens/s end to end (start to last row/batch), tokens per CPU second (this process
              and its workers: less sensitive to other load than wall time), time to the first row/batch.
              Variants alternate, `--repeats` times each; medians.
  resume      A JSONL file of >= --resume-gb GB (distinct records repeated with new ids). Cold index build
              (validating every record, spawn pool) with its MB/s, warm (cached) load, then for start steps at
              0/10/50/90% of the epoch: a fresh train_loader(start_step=s) timed from construction to the first
              MicroBatch (num_workers 0). Baselines: what a reader that cannot seek pays to get there: read and
              discard lines (measured), decode each as JSON (measured up to --json-measure-upto, 50% by
              default, extrapolated linearly beyond), and replay through tokenisation (rate measured on
              --replay-sample records, extrapolated).
  packing     Padding waste over one epoch, micro batch 4/8/16, max_seq_len 512: the bundled sft-rag file and
              generated records of widely varying length (1-5 passages of 10-60 words). Waste is
              1 - real tokens / (rows x row length) of `inputs["input_ids"]`, padded (`collate_micro`) against
              packed (`collate_micro(pack_to=512)`), with the rows fed and the mean collate time per batch
              (torch at one intra-op thread, as in a DataLoader worker).

Timings on a shared machine are noisy: compare the ratios (baseline and dstrain measured in the same run).
Results are printed as tables and written as JSON to --out.

Split over three files run as one script (bench/ is sys.path[0], so they import each other as siblings):
this one (throughput, packing, main), data_common.py (generated records, shared helpers) and
data_resume.py (the resume part).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data_common import (
    BUNDLED,
    FMT,
    cpu_seconds,
    machine,
    median_by_key,
    print_table,
    setup,
    timed,
    write_records,
)
from data_resume import bench_resume

# ------------------------------------------------------------------------------------------- throughput


def run_datasets(path: Path, tokenizer: Any, cfg: Any, cache: Path, num_proc: int | None) -> dict[str, float]:
    """load_dataset (Arrow conversion) + map(tokenize) into a fresh cache, then every row in file order."""
    from datasets import disable_progress_bars, load_dataset

    from dstrain.data.batches import tokenize_record
    from dstrain.data.records import parse_record

    disable_progress_bars()

    def tokenize_fn(row: Any) -> dict[str, list[int]]:
        example = tokenize_record(tokenizer, parse_record(dict(row), FMT), cfg)  # row: a LazyRow
        return {"input_ids": example.input_ids, "labels": example.labels}

    shutil.rmtree(cache, ignore_errors=True)
    cpu, started = cpu_seconds(), time.perf_counter()
    raw = load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    loaded = time.perf_counter()
    mapped = raw.map(tokenize_fn, remove_columns=raw.column_names, num_proc=num_proc)
    rows = iter(mapped)
    tokens = len(next(rows)["input_ids"])
    first = time.perf_counter()
    tokens += sum(len(row["input_ids"]) for row in rows)
    total, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    del rows, mapped, raw
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "tokens": tokens,
        "prepare_s": loaded - started,
        "first_s": first - started,
        "total_s": total,
        "tokens_per_s": tokens / total,
        "cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu,
    }


def run_dstrain(
    path: Path, tokenizer: Any, cfg: Any, micro: int, workers: int, seed: int
) -> dict[str, float]:
    """Cold index build (no cache) + one epoch of train_loader, summing the real tokens of each MicroBatch."""
    from dstrain.config.zero import BatchPlan
    from dstrain.data.index import index_file
    from dstrain.data.loader import LoaderOptions, TokenizedCorpus, steps_per_epoch, train_loader
    from dstrain.data.stream import Corpus

    cpu, started = cpu_seconds(), time.perf_counter()
    index = index_file(path, FMT, use_cache=False)
    indexed = time.perf_counter()
    dataset = TokenizedCorpus(Corpus([index]), tokenizer, cfg)
    plan = BatchPlan(micro, 1, 1)
    options = LoaderOptions(pad_id=tokenizer.pad_token_id, seed=seed, num_workers=workers)
    loader = train_loader(dataset, plan, options, 0, steps_per_epoch(len(dataset), plan))
    batches = iter(loader)
    batch = next(batches)
    tokens, bad = batch.tokens, len(batch.bad)
    first = time.perf_counter()
    for batch in batches:
        tokens += batch.tokens
        bad += len(batch.bad)
    del batches  # shuts the workers down, so their CPU time is counted
    total, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if bad:
        raise SystemExit(f"{bad} generated records came back bad")
    return {
        "tokens": tokens,
        "prepare_s": indexed - started,
        "first_s": first - started,
        "total_s": total,
        "tokens_per_s": tokens / total,
        "cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu,
    }


def bench_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tokenizer, cfg = setup()
    path = write_records(work / "throughput.jsonl", args.records, args.seed)
    size_mb = path.stat().st_size / 1e6
    print(f"throughput: {args.records} records, {size_mb:.1f} MB, micro {args.micro}", flush=True)
    variants: dict[str, Callable[[], dict[str, float]]] = {
        "datasets": lambda: run_datasets(path, tokenizer, cfg, work / "hf-cache", None),
        "datasets num_proc=2": lambda: run_datasets(path, tokenizer, cfg, work / "hf-cache", 2),
        "dstrain workers=0": lambda: run_dstrain(path, tokenizer, cfg, args.micro, 0, args.seed),
        "dstrain workers=2": lambda: run_dstrain(path, tokenizer, cfg, args.micro, 2, args.seed),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, fn in variants.items():
            runs[name].append(fn())
            print(f"  repeat {repeat + 1} {name}: {json.dumps(runs[name][-1])}", flush=True)
    results = {name: median_by_key(r) for name, r in runs.items()}
    base = results["datasets"]
    rows = [
        [
            name,
            f"{r['tokens']:,.0f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            f"{r['tokens_per_cpu_s']:,.0f}",
            f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x",
            f"{r['first_s']:.2f}",
            f"{r['first_s'] / base['first_s']:.3f}x",
            f"{r['prepare_s']:.2f}",
            f"{r['total_s']:.1f}",
        ]
        for name, r in results.items()
    ]
    print_table(
        f"Throughput ({args.records} records, {size_mb:.1f} MB; medians of {args.repeats}; ratio vs datasets)",
        [
            "variant",
            "tokens",
            "tokens/s",
            "ratio",
            "tokens/CPU-s",
            "ratio",
            "first batch s",
            "ratio",
            "convert/index s",
            "total s",
        ],
        rows,
    )
    return {"records": args.records, "file_mb": size_mb, "micro": args.micro, "runs": runs, "median": results}


# ------------------------------------------------------------------------------------------- packing


def epoch_batches(examples: list[Any], micro: int, pad_id: int, pack_to: int, seed: int) -> Iterator[Any]:
    """One epoch of train_loader over pre-tokenised examples (the same samples for padded and packed)."""
    from dstrain.config.zero import BatchPlan
    from dstrain.data.loader import ExampleDataset, LoaderOptions, steps_per_epoch, train_loader

    plan = BatchPlan(micro, 1, 1)
    dataset = ExampleDataset(examples)
    options = LoaderOptions(pad_id=pad_id, seed=seed, pack_to=pack_to)
    yield from train_loader(dataset, plan, options, 0, steps_per_epoch(len(dataset), plan))


def waste(examples: list[Any], micro: int, pad_id: int, pack_to: int, seed: int) -> dict[str, float]:
    real = cells = rows = batches = 0
    started = time.perf_counter()
    for batch in epoch_batches(examples, micro, pad_id, pack_to, seed):
        n, length = batch.inputs["input_ids"].shape
        real, cells, rows, batches = real + batch.tokens, cells + n * length, rows + n, batches + 1
    collate_s = time.perf_counter() - started
    return {
        "real_tokens": real,
        "cells": cells,
        "rows": rows,
        "batches": batches,
        "waste": 1 - real / cells,
        "ms_per_batch": collate_s / batches * 1e3,
    }


def bench_packing(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from dstrain.data.batches import tokenize_record
    from dstrain.data.records import read_file

    # One intra-op thread, as inside a DataLoader worker: the packed mask's L x L ops are otherwise split over
    # threads, and on a loaded 2-core machine a descheduled thread makes them 10-100x slower (noise, not cost).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer, cfg = setup()
    generated = write_records(work / "varied.jsonl", args.pack_records, args.seed + 1, (1, 5), (10, 60))
    sources = {"bundled sft_rag_train.jsonl": BUNDLED, "generated varied": generated}
    results: dict[str, Any] = {}
    rows = []
    for name, path in sources.items():
        examples = [tokenize_record(tokenizer, rec, cfg) for _, rec in read_file(path, FMT)]
        lengths = [len(e.input_ids) for e in examples]
        results[name] = {
            "records": len(examples),
            "length_min": min(lengths),
            "length_mean": statistics.mean(lengths),
            "length_max": max(lengths),
        }
        for micro in args.pack_micro:
            padded = waste(examples, micro, tokenizer.pad_token_id, 0, args.seed)
            packed = waste(examples, micro, tokenizer.pad_token_id, cfg.max_seq_len, args.seed)
            results[name][f"micro_{micro}"] = {"padded": padded, "packed": packed}
            rows.append(
                [
                    name,
                    f"{min(lengths)}/{statistics.mean(lengths):.0f}/{max(lengths)}",
                    micro,
                    f"{padded['waste']:.1%}",
                    f"{packed['waste']:.1%}",
                    f"{padded['rows']:,}",
                    f"{packed['rows']:,}",
                    f"{padded['rows'] / packed['rows']:.2f}x",
                    f"{padded['ms_per_batch']:.2f} / {packed['ms_per_batch']:.2f}",
                ]
            )
    print_table(
        f"Packing: one epoch, max_seq_len {cfg.max_seq_len}; waste = 1 - real tokens / (rows x row length); "
        "collate time with 1 torch thread",
        [
            "data",
            "tokens min/mean/max",
            "micro",
            "padded waste",
            "packed waste",
            "padded rows",
            "packed rows",
            "fewer rows",
            "ms/batch padded / packed",
        ],
        rows,
    )
    torch.set_num_threads(threads)
    return results


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["all", "throughput", "resume", "packing"], default="all")
    parser.add_argument("--records", type=int, default=20_000, help="throughput: generated records")
    parser.add_argument("--micro", type=int, default=8, help="throughput: micro batch size")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs / resume timings, each")
    parser.add_argument("--resume-gb", type=float, default=1.0, help="resume: file size (GB, 1e9 bytes)")
    parser.add_argument("--distinct", type=int, default=4000, help="resume: distinct records in the file")
    parser.add_argument("--resume-micro", type=int, default=8)
    parser.add_argument("--resume-accum", type=int, default=4)
    parser.add_argument("--replay-sample", type=int, default=2000, help="resume: records to time tokenising")
    parser.add_argument(
        "--json-measure-upto",
        type=float,
        default=0.5,
        help="resume: measure the JSON skip up to this fraction",
    )
    parser.add_argument("--pack-micro", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--pack-records", type=int, default=2000, help="packing: generated varied records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch dir (default: a fresh temp dir, removed after)")
    parser.add_argument("--out", default="data_bench_results.json")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still removes its 1 GB file
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as `dstrain train` sets it
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dstrain-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DSTRAIN_CACHE_DIR"] = str(work / "dstrain-cache")  # a cold index cache
    parts = ["throughput", "resume", "packing"] if args.part == "all" else [args.part]
    benches = {"throughput": bench_throughput, "resume": bench_resume, "packing": bench_packing}
    report: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    try:
        for part in parts:
            load = os.getloadavg()
            seconds, report[part] = timed(lambda part=part: benches[part](args, work))
            report[part]["loadavg_before_after"] = [load, os.getloadavg()]
            print(
                f"\n[{part}: {seconds:.0f} s; load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}]"
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
