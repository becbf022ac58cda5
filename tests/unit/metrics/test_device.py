"""Peak lookups by device name and the MFU arithmetic; no GPU needed (torch.cuda is stubbed where asked)."""

from __future__ import annotations

import pytest
import torch

from dstrain.metrics import device
from dstrain.metrics.device import PEAK_TFLOPS, device_stats, max_over_ranks, mfu, peak_flops, peak_tflops


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA L4", 121.0),
        ("nvidia h100 80gb hbm3", 989.0),
    ],
)
def test_known_devices(name, expected):
    assert peak_tflops(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA A10",  # not an A100 nor an A10G
        "NVIDIA L40",  # not an L4 nor an L40S
        "Tesla V100-SXM2-16GB",
        "NVIDIA H800",
        "NVIDIA GeForce RTX 4090",
        "",
    ],
)
def test_unknown_devices_get_no_peak(name):
    assert peak_tflops(name) is None


def test_every_key_finds_its_own_value_whatever_the_order():
    for key, tflops in PEAK_TFLOPS.items():
        assert peak_tflops(f"NVIDIA {key}") == tflops, key
        assert peak_tflops(f"NVIDIA {key}-SXM 80GB") == tflops, key


def test_table_covers_the_copies_it_replaced():
    # dstrain/metrics/meter.py, bench/bench_report.py and bench/gpu/bench_gpu.py each held one of these
    union = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
    assert union.items() <= PEAK_TFLOPS.items()


def test_peak_flops_uses_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    assert peak_flops() == pytest.approx(989e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA GeForce RTX 4090")
    assert peak_flops() is None


def test_no_peak_without_an_initialised_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops() is None
    assert mfu(1000.0, 10**9, 1) is None


def test_mfu_is_4n_flops_per_token_over_the_world_peak(monkeypatch):
    monkeypatch.setattr(device, "peak_flops", lambda: 100e12)
    # 1000 tok/s x 4 x 1e9 params = 4e12 FLOP/s against 2 x 100e12
    assert mfu(1000.0, 10**9, 2) == pytest.approx(0.02)
    assert mfu(0.0, 10**9, 1) == 0.0


def test_device_stats_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stats = device_stats()
    assert set(stats) == {"mem_gb"} and stats["mem_gb"] > 0  # the process RSS


def test_max_over_ranks_is_the_identity_in_one_process():
    stats = {"mem_gb": 1.5, "gpu_util": 30.0}
    assert max_over_ranks(stats) == stats
