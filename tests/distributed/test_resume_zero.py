"""Resume with real 2-rank DeepSpeed jobs: exact under ZeRO-2/3 (+ offload), elastic 2 -> 1 and 1 -> 2, and
SIGTERM delivered to the ranks the way Slurm delivers it. (A save that fails on all ranks without a hang:
tests/distributed/test_disk_full_ranks.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dstrain.checkpoint.layout import verify_checkpoint
from tests.helpers import (
    REPO,
    check,
    child_env,
    deepspeed_cmd,
    dstrain,
    metrics,
    train_ranks,
    train_single,
    ulps_at_largest,
    write_config,
)
from tests.integration.test_data_runtime import with_long_records

pytestmark = pytest.mark.distributed

STEPS, MIDDLE = 6, 3
FINAL = f"checkpoints/step-{STEPS:08d}"
# Elastic resume changes which rank reduces which partial sums: equal up to float summation order. The
# absolute part follows each tensor's largest entry (256 ulps of it, ~2e-5 x max): the adapter (~1e-2) and
# Adam's moments (exp_avg_sq ~1e-8) differ by orders of magnitude, and a fixed 1e-7 passed any exp_avg_sq.
ELASTIC_RTOL = 1e-5
ELASTIC_ULPS = 256


def make_config(tmp_path: Path, data: dict, name: str, ds: str, dropout: float) -> Path:
    return write_config(
        tmp_path,
        data,
        name,
        ds_config=f"ds_configs/{ds}.json",
        lora={"r": 8, "alpha": 16, "dropout": dropout},
        train={
            "max_steps": STEPS,
            "log_every": 1,
            "save_every": MIDDLE,
            "keep_last": 5,
            "global_batch_size": 8,
        },
    )


def fork_at_middle(run_dir: Path, name: str) -> Path:
    """A copy of the run dir as it was right after the middle checkpoint (later files removed)."""
    fork = run_dir.parent / name
    shutil.copytree(run_dir, fork)
    shutil.rmtree(fork / FINAL)
    (fork / "checkpoints" / "latest").write_text(f"step-{MIDDLE:08d}\n")
    return fork


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(str(run_dir / FINAL / "adapter_model.safetensors")),
        **{f"opt/{k}": v for k, v in load_file(str(run_dir / FINAL / "optimizer.safetensors")).items()},
    }


# ZeRO-3 is covered by zero3_offload (partitioned parameters and DeepSpeedCPUAdam's state): one launch pair less
@pytest.mark.parametrize("ds", ["zero2", "zero3_offload"])
def test_two_rank_resume_is_bitwise_exact(tmp_path: Path, small_data: dict, ds: str):
    """LoRA dropout on: each rank's RNG stream is restored too. Compared with torch.equal (bitwise, fp32)."""
    cfg = make_config(tmp_path, small_data, "full", ds, dropout=0.1)
    check(train_ranks(cfg, cwd=tmp_path))
    full = tmp_path / "full"
    fork = fork_at_middle(full, "resumed")
    check(dstrain("resume", str(fork), "--num-gpus", "2", cwd=tmp_path))
    assert losses(fork) == losses(full)
    want, got = final_tensors(full), final_tensors(fork)
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def assert_elastic_match(fork: Path, full: Path) -> None:
    got, want = losses(fork), losses(full)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(MIDDLE + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=ELASTIC_RTOL), step
    a, b = final_tensors(fork), final_tensors(full)
    for key in b:
        atol = ulps_at_largest(b[key], ELASTIC_ULPS)
        torch.testing.assert_close(
            a[key], b[key], rtol=ELASTIC_RTOL, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )
    state = json.loads((fork / FINAL / "trainer_state.json").read_text())
    ref = json.loads((full / FINAL / "trainer_state.json").read_text())
    assert {k: state[k] for k in ("step", "epoch", "cursor", "samples", "global_batch")} == {
        k: ref[k] for k in ("step", "epoch", "cursor", "samples", "global_batch")
    }


def test_elastic_two_ranks_to_one(tmp_path: Path, small_data: dict):
    # with records skipped as bad: met by one rank or the other, merged over ranks, carried by the checkpoint
    with_long_records(small_data["train"], (5, 20, 40, 60))
    cfg = make_config(tmp_path, small_data, "full", "zero2", dropout=0.0)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].update(on_error="skip", max_bad_fraction=0.1, group_by_length=False)
    cfg.write_text(yaml.safe_dump(raw))
    check(train_ranks(cfg, cwd=tmp_path))
    fork = fork_at_middle(tmp_path / "full", "on_one")
    proc = check(dstrain("resume", str(fork), cwd=tmp_path))
    assert "world 1, global batch 8 = micro 4 x accumulation 2 x world 1" in proc.stdout
    assert json.loads((fork / FINAL / "trainer_state.json").read_text())["world_size"] == 1
    assert_elastic_match(fork, tmp_path / "full")
    skipped = {
        run: [(r["skipped_records"], r["skipped_reads"]) for r in metrics(run) if "loss" in r]
        for run in (fork, tmp_path / "full")
    }
    assert skipped[fork] == skipped[tmp_path / "full"]
    assert 0 < skipped[fork][MIDDLE - 1][0] < skipped[fork][-1][0], (
        "bad records met before and after the resume"
    )


def test_elastic_one_rank_to_two(tmp_path: Path, small_data: dict):
    cfg = make_config(tmp_path, small_data, "full", "zero3", dropout=0.0)
    check(train_single(cfg, cwd=tmp_path))
    fork = fork_at_middle(tmp_path / "full", "on_two")
    check(dstrain("resume", str(fork), "--num-gpus", "2", cwd=tmp_path))
    assert json.loads((fork / FINAL / "trainer_state.json").read_text())["world_size"] == 2
    assert_elastic_match(fork, tmp_path / "full")


def rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(launcher.pid).children(recursive=True)
    return [
        p
        for p in children
        if "dstrain.train" in " ".join(p.cmdline()) and "--local_rank" in " ".join(p.cmdline())
    ]


@pytest.mark.solo  # a signal timed against the ranks' progress
def test_sigterm_to_the_ranks_saves_and_exits_zero(tmp_path: Path, small_data: dict):
    """Slurm preemption signals every task: each rank finishes the step, they agree, save once, exit 0."""
    cfg = write_config(
        tmp_path,
        small_data,
        "preempted",
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        train={"max_steps": 400, "log_every": 1, "save_every": 0, "global_batch_size": 8},
    )
    cmd = deepspeed_cmd("--module", "dstrain.train", "--config", str(cfg))
    launcher = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir = tmp_path / "preempted"
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file() or len(metrics(run_dir)) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0][-3000:]
        time.sleep(0.1)
    ranks = rank_processes(launcher)
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out[-3000:]
    assert "stopped at step" in out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    ckpt = run_dir / "checkpoints" / latest
    assert verify_checkpoint(ckpt) == []
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 400 and state["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("rng_state_*")) == [
        "rng_state_00000.safetensors",
        "rng_state_00001.safetensors",
    ]
