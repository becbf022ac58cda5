"""Shared parts of bench/data_bench.py: generated sft-rag records and the timing / table helpers."""

from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FMT = "sft-rag"
BUNDLED = REPO / "dstrain" / "assets" / "data" / "sft_rag_train.jsonl"


# ------------------------------------------------------------------------------------------- data


def vocabulary() -> list[str]:
    """The distinct words of the bundled data files: text the bundled tokenizer was made for."""
    words: set[str] = set()
    for path in sorted(BUNDLED.parent.glob("*.jsonl")):
        words.update(re.findall(r"[A-Za-z]+", path.read_text(encoding="utf-8")))
    return sorted(words)


def make_record(
    rng: random.Random, words: list[str], passages: tuple[int, int], passage_words: tuple[int, int]
) -> dict[str, Any]:
    def sentence(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    return {
        "query": sentence(rng.randint(6, 14)) + "?",
        "retrieval_result": [
            sentence(rng.randint(*passage_words)) + "." for _ in range(rng.randint(*passages))
        ],
        "answer": sentence(rng.randint(2, 20)) + ".",
    }


def write_records(
    path: Path, count: int, seed: int, passages: tuple[int, int] = (3, 5), words: tuple[int, int] = (40, 80)
) -> Path:
    rng, vocab = random.Random(seed), vocabulary()
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(count):
            fh.write(json.dumps(make_record(rng, vocab, passages, words)) + "\n")
    return path


def write_big_file(path: Path, target_bytes: int, distinct: int, seed: int) -> tuple[int, int]:
    """`distinct` records written again and again, each line with its own id, until `target_bytes`."""
    rng, vocab = random.Random(seed), vocabulary()
    bodies = [json.dumps(make_record(rng, vocab, (3, 5), (40, 80)))[1:] for _ in range(distinct)]
    written = lines = 0
    with path.open("w", encoding="utf-8", buffering=16 * 1024 * 1024) as fh:
        while written < target_bytes:
            chunk = "".join(f'{{"id": {lines + k}, {body}\n' for k, body in enumerate(bodies))
            fh.write(chunk)
            written += len(chunk.encode("utf-8"))
            lines += len(bodies)
    size = path.stat().st_size
    if size < target_bytes:
        raise SystemExit(f"{path} is {size} bytes, under the {target_bytes} asked for")
    return size, lines


# ------------------------------------------------------------------------------------------- helpers


def setup() -> tuple[Any, Any]:
    """The bundled tokenizer and the data config every part uses."""
    from dstrain.config.run import DataConfig, ModelConfig
    from dstrain.model.build import load_tokenizer

    return load_tokenizer(ModelConfig()), DataConfig(format=FMT, max_seq_len=512, max_passage_tokens=384)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children (pool and DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def median_by_key(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    sys.stdout.flush()


def machine() -> dict[str, Any]:
    import datasets
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "datasets": datasets.__version__,
    }
