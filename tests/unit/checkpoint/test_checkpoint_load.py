"""Choosing the checkpoint to resume from: every kind of damage is detected, named, and passed over."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dstrain.checkpoint.atomic import TMP_PREFIX
from dstrain.checkpoint.layout import MANIFEST, remove_stale_temp, write_latest
from dstrain.checkpoint.load import find_checkpoint
from dstrain.checkpoint.resume import check_overrides, elastic_ds_source
from dstrain.checkpoint.rng import capture_rng, restore_rng, seed_everything
from dstrain.checkpoint.state import REQUIRED, rng_file
from dstrain.errors import CheckpointError, ConfigError
from dstrain.metrics.sinks import keep_rows_up_to
from tests.unit.checkpoint.test_checkpoint_layout import make_checkpoint

# Stand-ins for every file a resumable checkpoint must hold (their content does not matter here).
FILES = {name: b"{}" for name in (*REQUIRED, rng_file(0))} | {"optimizer.safetensors": bytes(range(256)) * 8}


def run_with_checkpoints(tmp_path: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    root = tmp_path / "run" / "checkpoints"
    for step in steps:
        make_checkpoint(root / f"step-{step:08d}", FILES)
    write_latest(root, f"step-{steps[-1]:08d}")
    return tmp_path / "run"


def test_run_dir_resolves_to_newest_valid(tmp_path: Path):
    run = run_with_checkpoints(tmp_path)
    found = find_checkpoint(run)
    assert found.path.name == "step-00000004" and found.notes == []
    assert find_checkpoint(run / "checkpoints").path == found.path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated file": (lambda d: truncate(d / "optimizer.safetensors"), "optimizer.safetensors: size"),
    "flipped byte": (
        lambda d: flip_byte(d / "optimizer.safetensors"),
        "optimizer.safetensors: sha256 does not match",
    ),
    "missing file": (lambda d: (d / "scheduler.json").unlink(), "scheduler.json: missing"),
    "missing manifest": (lambda d: (d / MANIFEST).unlink(), "manifest.json: missing"),
    "garbled manifest": (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable manifest"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_broken_newest_is_named_and_previous_used(tmp_path: Path, kind: str):
    run = run_with_checkpoints(tmp_path)
    damage, expected = DAMAGE[kind]
    damage(run / "checkpoints" / "step-00000004")
    found = find_checkpoint(run)
    assert found.path.name == "step-00000002"
    assert len(found.notes) == 1
    assert "step-00000004" in found.notes[0] and expected in found.notes[0]


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_broken_checkpoint_given_explicitly_fails(tmp_path: Path, kind: str):
    run = run_with_checkpoints(tmp_path)
    ckpt = run / "checkpoints" / "step-00000004"
    damage, expected = DAMAGE[kind]
    damage(ckpt)
    with pytest.raises(CheckpointError, match="step-00000004") as info:
        find_checkpoint(ckpt)
    assert expected in str(info.value)


def test_no_valid_checkpoint_fails_listing_each(tmp_path: Path):
    run = run_with_checkpoints(tmp_path)
    for name in ("step-00000002", "step-00000004"):
        flip_byte(run / "checkpoints" / name / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="no valid checkpoint") as info:
        find_checkpoint(run)
    assert "step-00000002" in str(info.value) and "step-00000004" in str(info.value)


def test_no_checkpoints_and_missing_path(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such file"):
        find_checkpoint(tmp_path / "nope")


def test_latest_naming_a_missing_dir_is_reported(tmp_path: Path):
    run = run_with_checkpoints(tmp_path)
    write_latest(run / "checkpoints", "step-00000009")
    found = find_checkpoint(run)
    assert found.path.name == "step-00000004"
    assert any("step-00000009" in note and "does not exist" in note for note in found.notes)


def test_leftover_temp_dir_is_never_resumed_and_is_cleaned(tmp_path: Path):
    run = run_with_checkpoints(tmp_path)
    root = run / "checkpoints"
    half = root / f"{TMP_PREFIX}step-00000006.1234"
    half.mkdir()
    (half / "optimizer.safetensors").write_bytes(b"half written")
    assert find_checkpoint(run).path.name == "step-00000004"
    assert remove_stale_temp(root) == [half]
    assert not half.exists()


def test_checkpoint_moved_aside_by_a_killed_resave_is_put_back(tmp_path: Path):
    """Killed between moving the old copy of a step aside and renaming the new one in: keep the old one."""
    run = run_with_checkpoints(tmp_path)
    root = run / "checkpoints"
    aside = root / f"{TMP_PREFIX}old-step-00000004.999"
    (root / "step-00000004").rename(aside)
    remove_stale_temp(root)
    assert (root / "step-00000004").is_dir() and not aside.exists()
    assert find_checkpoint(run).path.name == "step-00000004"


def test_resume_overrides_only_non_structural():
    check_overrides(["train.max_steps=10", "train.save_every=5", "output_dir=/tmp/x", "data.num_workers=2"])
    check_overrides(["distributed.rendezvous_timeout_s=900", "distributed.heartbeat_timeout_s=0"])  # cluster
    with pytest.raises(ConfigError) as info:
        check_overrides(["lora.r=4", "train.max_steps=10", "data.seed=3"])
    assert len(info.value.problems) == 2
    assert "lora.r" in info.value.problems[0] and "data.seed" in info.value.problems[1]
    assert "train.max_steps" in info.value.problems[0]  # the message lists what may change


def test_elastic_source_leaves_accumulation_to_the_planner():
    raw = {"train_batch_size": 16, "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": "auto"}
    resolved = {"train_batch_size": 16, "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 2}
    out = elastic_ds_source(raw, resolved)
    assert out["gradient_accumulation_steps"] == "auto" and raw["gradient_accumulation_steps"] == 4
    assert out["train_micro_batch_size_per_gpu"] == 2  # the micro batch the run used, not re-derived


def test_rng_state_round_trip_through_safetensors(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    seed_everything(7)
    random.random(), np.random.rand(), torch.rand(3), np.random.randn()
    tensors, meta = capture_rng()
    save_file(tensors, str(tmp_path / "rng.safetensors"), metadata=meta)
    expected = (random.random(), float(np.random.randn()), torch.rand(4))
    seed_everything(123)
    restore_rng(load_file(str(tmp_path / "rng.safetensors")), meta)
    got = (random.random(), float(np.random.randn()), torch.rand(4))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_metrics_rows_after_the_checkpoint_are_dropped(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"step": 3, "eval_loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')  # cut by a kill
    keep_rows_up_to(path, 3)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 3]


def test_manifest_garbage_of_every_kind_falls_back(tmp_path: Path):
    run = run_with_checkpoints(tmp_path)
    manifest = run / "checkpoints" / "step-00000004" / MANIFEST
    for garbage in (
        b"\xff\xfe\x00not utf-8",
        b'{"files": []}',
        b'{"files": {"a.safetensors": {}}}',
        b"[1, 2]",
    ):
        manifest.write_bytes(garbage)
        found = find_checkpoint(run)
        assert found.path.name == "step-00000002", garbage
        assert "unreadable manifest" in found.notes[0]


def test_other_manifest_format_is_named(tmp_path: Path):
    run = run_with_checkpoints(tmp_path)
    manifest = run / "checkpoints" / "step-00000004" / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": "someone-else/1"}))
    assert "'someone-else/1' is not a dstrain checkpoint format" in find_checkpoint(run).notes[0]


def test_a_checkpoint_without_optimizer_state_is_not_resumable(tmp_path: Path):
    """Complete per its own manifest, but written without the files a resume needs (another layout)."""
    from dstrain.checkpoint.load import verify

    ckpt = make_checkpoint(
        tmp_path / "step-00000002", {"adapter_model.safetensors": b"x", "trainer_state.json": b"{}"}
    )
    problems = verify(ckpt)
    assert any("optimizer.safetensors: missing (not in the manifest)" in p for p in problems)
    assert any("rng_state_00000.safetensors: missing" in p for p in problems)


@pytest.mark.parametrize("state", [{"epoch": 0}, {"step": -1}, {"step": "3"}, [1, 2]])
def test_trainer_state_is_validated(tmp_path: Path, state):
    from dstrain.checkpoint.load import read_trainer_state

    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: .*step"):
        read_trainer_state(tmp_path)


def test_resume_of_a_loose_checkpoint_needs_an_output_dir(tmp_path: Path, monkeypatch):
    """A checkpoint copied out of its run has no run dir to continue in: the user must name one."""
    import dstrain.checkpoint.resume as resume

    loose = make_checkpoint(tmp_path / "backup" / "step-00000002", {"b.json": b"{}"})
    monkeypatch.setattr(resume.load, "find_checkpoint", lambda path: resume.load.Found(loose, []))
    monkeypatch.setattr(resume.load, "read_trainer_state", lambda ckpt: None)
    monkeypatch.setattr(resume.load, "read_config_yaml", lambda ckpt: "{}")
    with pytest.raises(ConfigError, match="not inside a run's checkpoints/ dir: pass --set output_dir"):
        resume.resume_config(loose, [])
