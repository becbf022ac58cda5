"""What the hardware reports and promises: memory per rank, GPU utilisation, and MFU against the card's peak."""

from __future__ import annotations

import contextlib
import re

import psutil
import torch

from dstrain.distributed.collectives import comm_device

# Dense bf16 tensor-core peaks in TFLOP/s: the one table for the project (bench/ imports it). From NVIDIA's
# datasheets, which print two figures: the dense one used here and, twice as high, the one with 2:4 sparsity.
# H100/H200 are the SXM parts (a PCIe H100 peaks at 756: its MFU reads low, as it always has); GH200 carries
# an H100/H200-class GPU at the same 989. A10G is AWS's variant of the A10 without a datasheet of its own: the
# A10's 125. An unknown device gets no MFU, not a guess.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The table's peak for a device name as torch reports it ("NVIDIA H100 80GB HBM3"), or None.

    A key must be a whole word of the name (words split at anything not a letter or digit), not a substring:
    "L4" must not claim an "L40S" or an "L40", nor "H200" a "GH200", whatever the order of the table.
    """
    words = set(re.findall(r"[A-Z0-9]+", device_name.upper()))
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in words), None)


def memory_gb() -> float:
    """Peak accelerator memory of this rank, or the process RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def device_stats() -> dict[str, float]:
    """This rank's memory and, on GPU, reserved memory and utilisation (NVML, when it answers)."""
    stats = {"mem_gb": memory_gb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["mem_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        # torch asks NVML (pynvml); without it, or without permission, the optional metric is left out.
        with contextlib.suppress(Exception):
            stats["gpu_util"] = float(torch.cuda.utilization())
    return stats


def peak_flops() -> float | None:
    """This rank's GPU peak in FLOP/s; None on CPU or an unknown card."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    tflops = peak_tflops(torch.cuda.get_device_name())
    return None if tflops is None else tflops * 1e12


def mfu(tokens_per_s: float, params: int, world: int) -> float | None:
    """Model FLOPs utilisation at 4N FLOPs per token: forward 2N plus backward to the activations 2N
    (frozen weights get no weight gradients under LoRA); attention FLOPs and recomputation not counted."""
    peak = peak_flops()
    return None if peak is None else tokens_per_s * 4 * params / (peak * world)


def max_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """The largest value of each stat on any rank: the rank closest to running out is the one that matters."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return stats

    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(keys, values.tolist(), strict=True))
