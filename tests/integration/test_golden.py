"""Golden run dirs (tests/fixtures/golden/): runs written by earlier dstrain versions must stay readable.

Each committed dir is copied to a temp dir (never written in place), its model rebuilt from model.json, and
then inspected, exported and resumed. The resumed steps reproduce the recorded losses within fp32 rounding,
not bitwise: the dirs were written on another machine, whose CPU kernels add in another order
(tests/numerics.py; the machine is in each dir's machine.json). What is bitwise on any machine is checked in
the same test: the resumed run saves at every step, a copy of it forked at step 3 resumes again, and both
end on the same losses, adapter and optimizer state to the bit (tests/integration/test_resume.py and
tests/distributed/test_resume_zero.py check the same bitwise on runs of their own, with today's optimizer).
A format-1 checkpoint (written here from the golden one in the old layout) loads for inspect, export and a
warm start. Regenerate nothing here: a new format adds a fixture (python -m tests.fixtures.golden.make).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dstrain.checkpoint import layout
from tests.fixtures.golden.make import write_model
from tests.helpers import REPO, check, dstrain, metrics, run
from tests.numerics import assert_close_to_record, machine_facts

GOLDEN = REPO / "tests" / "fixtures" / "golden"
KEPT = "step-00000002"


def golden_dirs(world: int) -> list[Path]:
    return sorted(GOLDEN.glob(f"ckpt*-v*/world{world}"))


def materialise(src: Path, tmp: Path) -> Path:
    """A working copy of a golden dir, with its model rebuilt (the model is not committed)."""
    work = tmp / src.parent.name / src.name
    shutil.copytree(src, work)
    write_model(work / "model", json.loads((work / "model.json").read_text()))
    return work


def recorded_losses(src: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(src / "run") if "loss" in r}


def resumed_losses(run_dir: Path) -> dict[int, float]:
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert len({r["step"] for r in rows}) == len(rows), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


def describe(facts: dict) -> str:
    return f"{facts['cpu']} ({facts['aten_cpu_capability']}, torch {facts['torch']})"


def provenance(src: Path) -> str:
    """Where `src`'s numbers were recorded and where they are recomputed, for failure messages."""
    recorded = json.loads((src / "machine.json").read_text())
    return f"{src.parent.name}/{src.name}: recorded on {describe(recorded)}, resumed on {describe(machine_facts())}"


def test_golden_fixtures_exist_and_stay_small():
    assert golden_dirs(1) and golden_dirs(2), "tests/fixtures/golden/ckpt*-v*/world{1,2} are committed"
    for src in golden_dirs(1) + golden_dirs(2):  # where the recorded numbers were computed
        facts = json.loads((src / "machine.json").read_text())
        assert {"cpu", "aten_cpu_capability", "torch", "deepspeed"} <= facts.keys(), src
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total < 1024 * 1024, f"golden fixtures are {total} bytes; keep them under 1 MB"


def test_version_commands():
    out = check(dstrain("--version", cwd=REPO)).stdout
    assert out.startswith("dstrain ") and "torch" not in out
    verbose = check(dstrain("--version", "--verbose", cwd=REPO)).stdout
    for name in ("torch", "deepspeed", "transformers", "peft"):
        assert f"  {name} " in verbose
    entry = check(run([sys.executable, "-m", "dstrain.train", "--version"], REPO)).stdout
    assert entry == out


@pytest.mark.parametrize("src", golden_dirs(1), ids=lambda p: p.parent.name)
def test_golden_inspect_and_export(src: Path, tmp_path: Path):
    work = materialise(src, tmp_path)
    info = json.loads(check(dstrain("inspect", "run", "--json", cwd=work)).stdout)
    assert info["valid"] and info["step"] == 2 and info["format"].startswith(layout.FORMAT_PREFIX)
    assert [row["status"] for row in info["data"]] == ["matches"]
    check(dstrain("export", "run", "--out", "exported", cwd=work))
    assert (work / "exported" / "adapter_model.safetensors").is_file()
    # the checkpoint names its base as the run gave it (relative, before 0.2.0); the export, absolute
    assert info["base"]["name_or_path"] == "model" and "from here only" in info["base"]["note"]
    exported = json.loads((work / "exported" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == str(work / "model")
    (work / "data" / "train.jsonl").write_text("{}\n")
    info = json.loads(dstrain("inspect", "run", "--json", cwd=work).stdout)
    assert info["data"][0]["status"].startswith("changed (sampled-sha256:")


def final_state(run_dir: Path) -> dict:
    final = run_dir / "checkpoints" / "step-00000004"
    return {
        name: load_file(str(final / name)) for name in ("adapter_model.safetensors", "optimizer.safetensors")
    }


def resume_and_fork(src: Path, tmp_path: Path, *launch: str) -> str:
    """Resume a working copy of `src` to its end, saving every step; check its losses against the record,
    then fork it at step 3 and resume the fork: losses and final state equal the first resume's bitwise.
    Returns what the first resume printed."""
    work = materialise(src, tmp_path)
    first = check(dstrain("resume", "run", *launch, "--set", "train.save_every=1", cwd=work)).stdout
    assert "resuming from" in first and "at step 2" in first
    losses = resumed_losses(work / "run")  # every step exactly once
    assert_close_to_record(losses, recorded_losses(src), provenance(src))
    fork = work / "fork"
    shutil.copytree(work / "run", fork)
    shutil.rmtree(fork / "checkpoints" / "step-00000004")
    (fork / "checkpoints" / "latest").write_text("step-00000003\n")
    proc = check(dstrain("resume", "fork", *launch, cwd=work))
    assert "at step 3" in proc.stdout
    assert resumed_losses(fork) == losses  # bitwise: the same machine, the same test
    want, got = final_state(work / "run"), final_state(fork)
    for name, tensors in want.items():
        assert [k for k in tensors if not torch.equal(tensors[k], got[name][k])] == [], name
    return first


@pytest.mark.numerics
@pytest.mark.parametrize("src", golden_dirs(1), ids=lambda p: p.parent.name)
def test_golden_resume_reproduces_recorded_losses(src: Path, tmp_path: Path):
    resume_and_fork(src, tmp_path)


def write_format_1(ckpt: Path) -> None:
    """Rewrite a format-2 checkpoint in the format-1 layout (git show 1a0ffc4:dstrain/checkpoint/save.py):
    no optimizer, scheduler, RNG or ZeRO source JSON; trainer state without the fields added since."""
    for name in ("optimizer.safetensors", "scheduler.json", "ds_config.source.json", layout.MANIFEST):
        (ckpt / name).unlink()
    for rng in ckpt.glob("rng_state_*.safetensors"):
        rng.unlink()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for key in ("train_samples", "nonfinite_steps", "best_step", "data_files"):
        state.pop(key)
    state["versions"] = None
    (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    manifest = layout.build_manifest(ckpt)
    manifest.pop("dstrain")
    manifest["format"] = "dstrain-checkpoint/1"
    (ckpt / layout.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def test_a_format_1_checkpoint_inspects_exports_and_warm_starts(tmp_path: Path):
    work = materialise(golden_dirs(1)[-1], tmp_path)
    write_format_1(work / "run" / "checkpoints" / KEPT)
    info = json.loads(check(dstrain("inspect", "run", "--json", cwd=work)).stdout)
    assert info["format"] == "dstrain-checkpoint/1" and info["resumable"].startswith("warm start")
    check(dstrain("export", "run", "--out", "exported", cwd=work))
    proc = check(dstrain("resume", "run", cwd=work))
    assert "warm start from its adapter weights at step 2" in proc.stdout + proc.stderr
    losses = resumed_losses(work / "run")
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())
    final = json.loads((work / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert final["step"] == 4 and final["versions"]["dstrain"]
    manifest = json.loads((work / "run" / "checkpoints" / "step-00000004" / layout.MANIFEST).read_text())
    assert manifest["format"] == layout.FORMAT  # a warm start writes today's format from then on


def test_resume_refuses_changed_golden_data(tmp_path: Path):
    work = materialise(golden_dirs(1)[-1], tmp_path)
    data = work / "data" / "train.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same samples, another order
    proc = dstrain("resume", "run", cwd=work)
    assert proc.returncode != 0 and "fingerprint sampled-sha256:" in proc.stderr
    assert "Traceback" not in proc.stderr
