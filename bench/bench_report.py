"""Reporting for the framework benchmarks: MFU, the machine and load lines, markdown tables, ratios, results JSON."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import Throughput

# the frameworks the machine line names; a missing one is named missing (a run without TRL gives dstrain rows)
FRAMEWORKS = ("torch", "transformers", "peft", "trl", "deepspeed", "liger_kernel")


def mfu(tokens_per_s: float, params: int, world: int) -> float | None:
    """Model FLOPs utilisation at 4N FLOPs per token (LoRA: forward 2N + backward to the activations 2N; the
    frozen weights get no weight gradient; attention FLOPs not counted); None off a known GPU."""
    import torch

    from dstrain.metrics.device import peak_tflops

    if not torch.cuda.is_available():
        return None
    peak = peak_tflops(torch.cuda.get_device_name(0))
    return None if peak is None else 4 * params * tokens_per_s / (peak * 1e12 * world)


def load_line() -> str:
    """The 1/5/15-minute load averages: timing runs on a shared machine must say how busy it was."""
    with contextlib.suppress(OSError):
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
    return "load average unknown"


def version(name: str) -> str:
    """`name`'s version, or "missing" when it does not import (absent, blocked or broken)."""
    try:
        module = importlib.import_module(name)
    except Exception:  # a broken install reads as missing: the rows that need it are not run
        return "missing"
    return str(getattr(module, "__version__", "?"))


def machine_line() -> str:
    """CPU, GPU, Python and framework versions, load: the header of every result."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    versions = ", ".join(f"{name} {version(name)}" for name in FRAMEWORKS)
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}; python {platform.python_version()}, {versions}; {load_line()}"


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    sys.stdout.flush()


def ratio(a: Throughput | None, b: Throughput | None, pairs: bool = False) -> str:
    if a is None or b is None:
        return "n/a"
    if pairs:
        return f"{a.pairs_per_s / b.pairs_per_s:.2f}x"
    return f"{a.tokens_per_s / b.tokens_per_s:.2f}x"


def save_results(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON, atomically: a run killed mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    partial.replace(path)


def fmt_mfu(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "n/a (CPU)"


def run_order(variants: list[str], order: str) -> list[str]:
    """The variants in the order asked: "reverse" runs the last first, so no framework always runs first."""
    return list(reversed(variants)) if order == "reverse" else list(variants)


def as_dicts(results: dict[str, Throughput | None]) -> dict[str, dict[str, Any] | None]:
    """A table's rows as JSON-ready dicts (None: the row failed)."""
    return {name: (vars(res) if res is not None else None) for name, res in results.items()}


def collect_runs(
    out: Path | None, header: dict[str, Any], vocabs: list[int], bench: Any
) -> list[dict[str, Any]]:
    """Run `bench(vocab, progress)` per vocab; with `out`, rewrite the results JSON after every row, marked
    "complete": false until the last table is done, so a run cut at its deadline keeps the rows it finished."""
    runs: list[dict[str, Any]] = []

    def save(current: dict[str, Any] | None, complete: bool = False) -> None:
        if out:
            save_results(out, {**header, "complete": complete, "runs": runs + ([current] if current else [])})

    for vocab in vocabs:
        runs.append(bench(vocab, save))
    save(None, complete=True)
    return runs


def run_tables(args: Any, header: dict[str, Any], bench: Any, started: float) -> list[dict[str, Any]]:
    """Every vocab's table (one for a given --model-dir), then the machine's load and the total time."""
    runs = collect_runs(args.out, header, [0] if args.model_dir else args.vocab, bench)
    print(f"\n{load_line()}; total {time.perf_counter() - started:.0f} s, {len(runs)} table(s)")
    return runs
