"""A resume with another train.max_steps never re-warms and never raises the LR without saying so: `keep`
follows the original plan, `stretch` continues its decay from the checkpoint's next LR over the new length.
Each resume runs on its own copy of one 12-step run saved at step 6, and the start-up line says which."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from tests.helpers import check, dstrain, make_small_data, metrics, write_config

SAVED, PLANNED = 6, 12


def lrs(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["lr"] for row in metrics(run_dir) if "lr" in row}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("schedule")
    config = write_config(
        root,
        make_small_data(root),
        name="base",
        data={"eval": []},
        train={"max_steps": PLANNED, "log_every": 1, "save_every": SAVED, "global_batch_size": 8},
    )
    check(dstrain("train", "--config", str(config), cwd=root))
    return root / "base"


def resume(base: Path, name: str, steps: int, *options: str) -> tuple[dict[int, float], str]:
    run_dir = base.parent / name
    shutil.copytree(base, run_dir)
    for later in (run_dir / "checkpoints").glob("step-*"):
        if later.name != f"step-{SAVED:08d}":
            shutil.rmtree(later)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{SAVED:08d}\n")
    (run_dir / "metrics.jsonl").write_text("")
    proc = check(
        dstrain("resume", str(run_dir), "--set", f"train.max_steps={steps}", *options, cwd=base.parent)
    )
    return lrs(run_dir), proc.stdout + proc.stderr


def test_the_original_run_never_trains_at_zero(base: Path):
    planned = lrs(base)
    assert sorted(planned) == list(range(1, PLANNED + 1))
    assert all(lr > 0 for lr in planned.values()), planned


@pytest.mark.parametrize("steps", [20, 9])
def test_keep_follows_the_original_plan(base: Path, steps: int):
    planned = lrs(base)
    got, out = resume(base, f"keep-{steps}", steps, "--schedule", "keep")
    assert "LR schedule: kept" in out, out
    for step in range(SAVED + 1, min(steps, PLANNED) + 1):
        assert got[step] == planned[step], step  # the same plan, bitwise
    assert all(got[step] <= got[SAVED + 1] for step in got)  # decaying: never above the checkpoint's
    if steps > PLANNED:
        assert f"the original plan ends at step {PLANNED}" in out, out
    else:
        assert f"stops at step {steps}, before the original plan's end at step {PLANNED}" in out, out


@pytest.mark.parametrize("steps", [20, 9])
def test_stretch_continues_the_decay_over_the_new_length(base: Path, steps: int):
    planned = lrs(base)
    got, out = resume(base, f"stretch-{steps}", steps)  # a changed length stretches by default
    assert f"LR schedule: stretch (length {PLANNED} -> {steps} steps)" in out, out
    assert sorted(got) == list(range(SAVED + 1, steps + 1))
    assert got[SAVED + 1] == pytest.approx(planned[SAVED + 1], rel=1e-12)  # continuous at the resume
    values = [got[step] for step in sorted(got)]
    assert all(a > b for a, b in itertools.pairwise(values)), values  # decays, no re-warm
    assert values[-1] > 0
    if steps > PLANNED:
        assert got[PLANNED] > planned[PLANNED]  # spread over more steps: higher than the plan at its end
    else:
        assert got[steps] < planned[steps]  # squeezed into fewer steps
