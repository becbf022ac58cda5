"""Upstream data benchmark: a big JSON array read by `validate-data` and `train` (peak RSS against the file
size and against `json.load`), and `dstrain convert` of a big JSONL file (peak RSS against size, MB/s).

Run (scratch files go to --work, by default a temp dir removed after):
    python bench/convert_bench.py                                # both parts: 200 MB array, 100 MB + 1 GB JSONL
    python bench/convert_bench.py --part array --array-mb 200
    python bench/convert_bench.py --part convert --convert-mb 100 1024

Parts:
  array    A JSON array of generated sft-rag records, indented as KBAlign writes its SFT output (one record
           over many lines), of --array-mb MB. Each step is a fresh process, its peak RSS read from
           getrusage(RUSAGE_CHILDREN) by a wrapper: `json.load` of the file (the baseline: what reading it
           "directly" costs), `dstrain validate-data` (cold: builds the index), `dstrain train` for 3 steps of
           the tiny model on it, and the same training on a 1 MB array (the difference is what the big file
           costs training; one untimed warm-up run first, which builds DeepSpeed's CPU ops once).
  convert  DDR scored output (JSONL: query, 5 passages, 4 sampled answers with rouge_score, chat-templated
           prompts, as UltraRAG writes it) of each --convert-mb size, converted with `dstrain convert --from
           ddr --to preference`: wall time, MB/s of input, peak RSS. Constant memory: the RSS does not grow
           with the size.

Timings on a shared machine are noisy; the RSS figures are not. Results are printed and written as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

MB = 1024 * 1024
WORDS = [f"w{i}" for i in range(2000)] + ["渭河", "黄河", "Ünïcödé", "river", "mountain", "founded"]
WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.run(sys.argv[1:], "
    "stdout=subprocess.DEVNULL).returncode; print(rc, time.perf_counter() - t, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `cmd` in a fresh wrapper process: exit code, wall seconds, peak RSS (MiB) of its process tree."""
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env, check=True
    )
    rc, wall, rss_kb = out.stdout.split()
    return {"rc": int(rc), "wall_s": round(float(wall), 2), "peak_rss_mib": round(int(rss_kb) / 1024, 1)}


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def sft_record(rng: random.Random, i: int) -> dict[str, Any]:
    passages = [words(rng, rng.randint(40, 80)) for _ in range(rng.randint(3, 5))]
    return {
        "query": f"question {i}: {words(rng, 8)}?",
        "retrieval_result": passages,
        "answer": words(rng, 12),
    }


def write_array(path: Path, target: int, seed: int = 0) -> int:
    """A JSON array of at least `target` bytes, indent 4; returns the number of records."""
    rng, n = random.Random(seed), 0
    with path.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        while fh.tell() < target:
            body = json.dumps(sft_record(rng, n), ensure_ascii=False, indent=4)
            fh.write(("" if n == 0 else ",\n") + "    " + body.replace("\n", "\n    "))
            n += 1
        fh.write("\n]\n")
    return n


def ddr_record(rng: random.Random, i: int) -> dict[str, Any]:
    rag = sft_record(rng, i)
    scores = sorted((rng.random() for _ in range(4)), reverse=True)
    context = [
        {"text": words(rng, 15), "temperature": t, "type": k, "rouge_score": s}
        for t, k, s in zip((0.5, 0.7, 0.9, 1.0), ("raw", "aug", "raw", "aug"), scores, strict=True)
    ]
    prompt = (
        "<|im_start|>user\n"
        + "\n".join(rag["retrieval_result"])
        + f"\n{rag['query']}<|im_end|>\n<|im_start|>assistant\n"
    )
    return {
        "id": i, "query": rag["query"], "retrieval_result": rag["retrieval_result"], "ground_truth": rag["answer"],
        "keypoints": words(rng, 10), "context": context, "chosen": context[0], "rejected": context[-1],
        "raw_input": prompt, "augment_input": prompt, "file_index": 0, "chunk_index": i, "chunk": rag["retrieval_result"][0],
    }  # fmt: skip


def write_ddr(path: Path, target: int, seed: int = 1) -> int:
    """DDR scored output of at least `target` bytes: 2,000 distinct records repeated with new ids."""
    rng = random.Random(seed)
    distinct = [ddr_record(rng, i) for i in range(2000)]
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        while fh.tell() < target:
            fh.write(json.dumps(dict(distinct[n % len(distinct)], id=n), ensure_ascii=False) + "\n")
            n += 1
    return n


def train_config(work: Path, data: Path, name: str) -> Path:
    raw = {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [str(data)], "format": "sft-rag", "max_seq_len": 256, "max_passage_tokens": 160},
        "train": {"max_steps": 3, "log_every": 1, "save_every": 3, "global_batch_size": 4},
        "output_dir": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def dstrain_bin() -> str:
    return str(Path(sys.executable).with_name("dstrain"))


def part_array(work: Path, size_mb: int, env: dict[str, str]) -> dict[str, Any]:
    big, small = work / "big.json", work / "small.json"
    n = write_array(big, size_mb * MB)
    write_array(small, MB)
    result: dict[str, Any] = {"file_mib": round(big.stat().st_size / MB, 1), "records": n}
    result["json.load"] = measured([sys.executable, "-c", f"import json; json.load(open({str(big)!r}))"], env)
    result["validate-data"] = measured([dstrain_bin(), "validate-data", str(big), "--format", "sft-rag"], env)
    small_config = train_config(work, small, "small")
    measured(
        [dstrain_bin(), "train", "--config", str(small_config), "--set", "output_dir=" + str(work / "warm")],
        env,
    )
    result["train 3 steps (1 MB array)"] = measured(
        [dstrain_bin(), "train", "--config", str(train_config(work, small, "small"))], env
    )
    result["train 3 steps"] = measured(
        [dstrain_bin(), "train", "--config", str(train_config(work, big, "big"))], env
    )
    return result


def part_convert(work: Path, sizes_mb: list[int], env: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes_mb:
        src, dst = work / f"ddr_{size}.jsonl", work / f"pref_{size}.jsonl"
        n = write_ddr(src, size * MB)
        run = measured(
            [dstrain_bin(), "convert", str(src), "--from", "ddr", "--to", "preference", "--out", str(dst)],
            env,
        )
        mib = src.stat().st_size / MB
        rows.append(
            {"input_mib": round(mib, 1), "records": n, **run, "mb_per_s": round(mib / run["wall_s"], 1)}
        )
        src.unlink()
        dst.unlink(missing_ok=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["array", "convert", "all"], default="all")
    parser.add_argument("--array-mb", type=int, default=200)
    parser.add_argument("--convert-mb", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, OMP_NUM_THREADS="1", DSTRAIN_CACHE_DIR=str(work / "cache"), TOKENIZERS_PARALLELISM="false"
    )
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        if args.part in ("array", "all"):
            results["array"] = part_array(work, args.array_mb, env)
            print(json.dumps(results["array"], indent=1))
        if args.part in ("convert", "all"):
            results["convert"] = part_convert(work, args.convert_mb, env)
            print(json.dumps(results["convert"], indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
