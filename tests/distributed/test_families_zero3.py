"""Families with transformed logits under ZeRO-3 on 2 ranks (one with CPU offload): 10 steps with a save at
step 5, then a resume of that checkpoint on 1 rank with doubled accumulation; its losses equal the 2-rank
run's (rel 1e-5). The chunked head's transform and its ZeRO-3 gathered weight, the first-batch self-check
on every rank, and a world-size-independent checkpoint of each family."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.families import write_family
from tests.helpers import check, dstrain, metrics, train_ranks, write_config

pytestmark = pytest.mark.distributed

STEPS, MIDDLE = 10, 5


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize(("family", "ds"), [("gemma2", "zero3"), ("minicpm3", "zero3_offload")])
def test_family_on_two_ranks_resumes_on_one(tmp_path: Path, small_data: dict, family: str, ds: str):
    model_dir = write_family(family, tmp_path / "model")
    config = write_config(
        tmp_path,
        small_data,
        "full",
        model={"path": str(model_dir)},
        ds_config=f"ds_configs/{ds}.json",
        train={"max_steps": STEPS, "save_every": MIDDLE, "global_batch_size": 8, "eval_every": 0},
    )
    proc = check(train_ranks(config, cwd=tmp_path))
    assert "log-probs: chunked head" in proc.stdout
    full = tmp_path / "full"
    fork = tmp_path / "on_one"
    shutil.copytree(full, fork)
    shutil.rmtree(fork / "checkpoints" / f"step-{STEPS:08d}")
    (fork / "checkpoints" / "latest").write_text(f"step-{MIDDLE:08d}\n")
    proc = check(dstrain("resume", str(fork), cwd=tmp_path))
    assert "micro 4 x accumulation 2 x world 1" in proc.stdout
    want, got = losses(full), losses(fork)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(MIDDLE + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    assert want[STEPS] < want[1]
