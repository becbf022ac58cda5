"""Start-up of a plain 1-rank run as users start it: what it imports, the optimizer it says it uses, the
time per phase it prints, and a resume onto the other Adam implementation (old checkpoints ran DeepSpeed's)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dstrain.checkpoint import layout
from tests.helpers import REPO, check, dstrain, make_small_data, run, train_losses, write_config

# Runs dstrain.train.main in a child, then reports what the run imported.
PROBE = """
import sys
from dstrain.train import main
code = main(["--config", sys.argv[1]])
print("IMPORTED", *sorted(m for m in ("bitsandbytes", "wandb") if sys.modules.get(m) is not None))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("startup")
    cfg = write_config(tmp, make_small_data(tmp), train={"max_steps": 4, "save_every": 2, "eval_every": 0})
    proc = check(run([sys.executable, "-c", PROBE, str(cfg)], REPO))
    return tmp / "run", proc.stdout


def test_a_plain_run_imports_neither_bitsandbytes_nor_wandb(plain_run):
    _, out = plain_run
    imported = [line for line in out.splitlines() if line.startswith("IMPORTED")]
    assert imported == ["IMPORTED"], imported


def test_it_says_its_optimizer_and_its_start_up_phases(plain_run):
    run_dir, out = plain_run
    assert out.count("optimizer: torch AdamW (foreach)") == 1
    phases = [line for line in out.splitlines() if line.startswith("start-up ")]
    assert len(phases) == 1
    for name in ("imports", "config", "data index", "model build", "engine", "first step"):
        assert f"{name} " in phases[0]
    first = next(json.loads(line) for line in (run_dir / "metrics.jsonl").open() if '"loss"' in line)
    assert first["startup_total_s"] > 0 and first["startup_engine_s"] >= 0
    sched = json.loads((run_dir / "checkpoints" / "step-00000002" / "scheduler.json").read_text())
    assert sched["optimizer_implementation"] == "torch"


@pytest.mark.numerics
def test_a_checkpoint_of_either_optimizer_resumes_on_the_one_it_records(plain_run, tmp_path):
    """A checkpoint without the record (written before dstrain chose) continues on DeepSpeed's FusedAdam from
    the same moments: the losses follow the torch run's to fp32 rounding (bitwise only on the same one)."""
    run_dir, _ = plain_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000004")
    (copy / "checkpoints" / "latest").write_text("step-00000002\n")
    sched_file = copy / "checkpoints" / "step-00000002" / "scheduler.json"
    sched = json.loads(sched_file.read_text())
    del sched["optimizer_implementation"]
    sched_file.write_text(json.dumps(sched))
    manifest = layout.build_manifest(sched_file.parent)
    (sched_file.parent / layout.MANIFEST).write_text(json.dumps(manifest))
    out = check(dstrain("resume", str(copy), cwd=REPO)).stdout
    assert "optimizer: DeepSpeed FusedAdam" in out
    got, want = train_losses(copy), train_losses(run_dir)
    assert got[:2] == want[:2] and got[2:] == pytest.approx(want[2:], rel=1e-5)
