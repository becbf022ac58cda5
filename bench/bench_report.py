"""Reporting for the framework benchmarks: MFU, the machine and load lines, markdown tables, ratios, results JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from bench_common import Throughput

# ------------------------------------------------------------------------------------------- report


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense tensor-core peaks


def mfu(tokens_per_s: float, params: int, world: int) -> float | None:
    """Model FLOPs utilisation at 4N FLOPs per token (LoRA: forward 2N + backward to the activations 2N; the
    frozen weights get no weight gradient; attention FLOPs not counted); None off a known GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None if peak is None else 4 * params * tokens_per_s / (peak * 1e12 * world)


def load_line() -> str:
    """The 1/5/15-minute load averages: timing runs on a shared machine must say how busy it was."""
    with contextlib.suppress(OSError):
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
    return "load average unknown"


def machine_line() -> str:
    import deepspeed
    import peft
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return (
        f"{cpu}, {os.cpu_count()} CPUs{gpu}; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, "
        f"deepspeed {deepspeed.__version__}; {load_line()}"
    )


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
