"""Checkpoint formats: every format dstrain has written loads (format 1 as a warm start), a newer one is one
clear error naming both formats, and every manifest names the dstrain that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dstrain import __version__
from dstrain.checkpoint import layout
from dstrain.checkpoint.load import find_checkpoint, read_trainer_state, verify
from dstrain.checkpoint.report import inspect_checkpoint
from dstrain.checkpoint.resume import resume_config
from dstrain.checkpoint.state import REQUIRED, REQUIRED_V1, rng_file
from dstrain.errors import CheckpointError

V1_STATE = {  # trainer_state.json as dstrain wrote it in format 1 (git show 1a0ffc4:dstrain/checkpoint/save.py)
    "step": 2,
    "epoch": 0,
    "samples": 8,
    "tokens": 600,
    "world_size": 1,
    "global_batch": 4,
    "cursor": 8,
    "best_metric": None,
    "best_checkpoint": None,
    "config_digest": "abc",
    "versions": None,
}
DS = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "optimizer": {"type": "AdamW"}}


def write_files(ckpt: Path, names: tuple[str, ...]) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    for name in names:
        (ckpt / name).write_text("{}", encoding="utf-8")
    (ckpt / "trainer_state.json").write_text(json.dumps(V1_STATE), encoding="utf-8")
    config = {"data": {"train": ["train.jsonl"]}, "output_dir": "run"}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (ckpt / "ds_config.json").write_text(json.dumps(DS), encoding="utf-8")


def write_manifest(ckpt: Path, fmt: str, writer: str | None = __version__) -> None:
    manifest = layout.build_manifest(ckpt)
    manifest["format"] = fmt
    if writer is None:
        manifest.pop("dstrain")  # format 1 did not record the writer
    else:
        manifest["dstrain"] = writer
    (ckpt / layout.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def v1_checkpoint(root: Path, step: int = 2) -> Path:
    """The format-1 layout: adapter, adapter config, trainer state, config, ZeRO JSON, manifest."""
    ckpt = root / "checkpoints" / layout.step_name(step)
    write_files(ckpt, REQUIRED_V1)
    write_manifest(ckpt, "dstrain-checkpoint/1", writer=None)
    return ckpt


def v2_checkpoint(root: Path, step: int, fmt: str = layout.FORMAT, writer: str = __version__) -> Path:
    ckpt = root / "checkpoints" / layout.step_name(step)
    write_files(ckpt, (*REQUIRED, rng_file(0)))
    write_manifest(ckpt, fmt, writer)
    return ckpt


def test_every_manifest_names_format_and_dstrain_version(tmp_path: Path):
    ckpt = v2_checkpoint(tmp_path, 2)
    manifest = json.loads((ckpt / layout.MANIFEST).read_text())
    assert layout.build_manifest(ckpt)["dstrain"] == __version__
    assert manifest["format"] == "dstrain-checkpoint/2" and layout.FORMAT_VERSION == 2
    assert sorted(layout.FORMATS) == list(range(1, layout.FORMAT_VERSION + 1))  # never drop a format


def test_a_format_1_checkpoint_verifies_and_loads(tmp_path: Path):
    ckpt = v1_checkpoint(tmp_path)
    assert verify(ckpt) == []
    found = find_checkpoint(tmp_path)
    assert found.path == ckpt and found.format == 1
    state = read_trainer_state(ckpt)
    assert (state.step, state.cursor, state.versions, state.data_files) == (2, 8, {}, [])


def test_a_format_1_checkpoint_resumes_as_a_warm_start(tmp_path: Path):
    v1_checkpoint(tmp_path)
    cfg, point = resume_config(tmp_path, [])
    assert point.warm_start and point.format == 1
    assert any("format-1" in note and "Adam's moments start from zero" in note for note in point.notes)
    assert point.ds_source["train_micro_batch_size_per_gpu"] == 4  # format 1 kept the resolved JSON only
    assert cfg.train.global_batch_size == 4


def test_format_2_is_an_exact_resume(tmp_path: Path):
    v2_checkpoint(tmp_path, 4)
    assert find_checkpoint(tmp_path).format == 2
    _, point = resume_config(tmp_path, [])
    assert not point.warm_start and point.notes == []


def test_a_newer_format_is_one_error_naming_both(tmp_path: Path):
    ckpt = v2_checkpoint(tmp_path, 2, fmt="dstrain-checkpoint/3", writer="9.1.0")
    for path in (ckpt, tmp_path):
        with pytest.raises(CheckpointError) as err:
            find_checkpoint(path)
        message = str(err.value)
        assert "'dstrain-checkpoint/3'" in message and "dstrain 9.1.0" in message
        assert "'dstrain-checkpoint/2'" in message and "Upgrade dstrain" in message
    with pytest.raises(CheckpointError, match="dstrain-checkpoint/3"):
        inspect_checkpoint(ckpt)


def test_a_newer_format_is_never_passed_over_for_an_older_checkpoint(tmp_path: Path):
    """Falling back to step 2 would roll the run back and archive the step-4 checkpoint as abandoned."""
    v2_checkpoint(tmp_path, 2)
    v2_checkpoint(tmp_path, 4, fmt="dstrain-checkpoint/3")
    with pytest.raises(CheckpointError, match="Upgrade dstrain"):
        find_checkpoint(tmp_path)


def test_a_foreign_format_is_reported_as_broken(tmp_path: Path):
    v2_checkpoint(tmp_path, 2)
    v2_checkpoint(tmp_path, 4, fmt="someone-else/7")
    found = find_checkpoint(tmp_path)
    assert found.path.name == "step-00000002"
    assert "'someone-else/7' is not a dstrain checkpoint format" in found.notes[0]


def test_inspect_names_format_writer_and_warm_start(tmp_path: Path, capsys: pytest.CaptureFixture):
    ckpt = v1_checkpoint(tmp_path)
    assert inspect_checkpoint(ckpt, as_json=True) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "dstrain-checkpoint/1" and info["written_by"] is None
    assert info["resumable"].startswith("warm start")


def test_warm_schedule_continues_the_lr_schedule():
    """The LR an uninterrupted run uses after `step` steps: the run's scheduler stepped as many times, from
    where a fresh engine's starts (DeepSpeed's own count -1 here: its alignment is kept)."""
    from dstrain.checkpoint.state import TrainerState
    from dstrain.training.restore import warm_schedule

    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 10, "total_num_steps": 100}
    ds = {"scheduler": {"type": "WarmupDecayLR", "params": {**params, "warmup_type": "linear"}}}
    fresh = {"optimizer_step": 0, "global_steps": 0, "global_samples": 0, "param_group_lr": [0.0]}
    fresh["scheduler"] = {"last_batch_iteration": -1}
    sched = warm_schedule(fresh, ds, TrainerState(step=5, samples=20))
    assert sched["scheduler"] == {"last_batch_iteration": 4, "stretch": None}
    assert sched["param_group_lr"] == [pytest.approx(4 / 10 * 1e-3)]
    assert (sched["optimizer_step"], sched["global_steps"], sched["global_samples"]) == (0, 5, 20)


def test_warm_schedule_from_a_planned_start_gives_the_next_updates_lr():
    """A fresh engine today starts its schedule at iteration 1 (update k uses iteration k): after 5 steps the
    next update, the 6th, uses iteration 6 of the linear warmup."""
    from dstrain.checkpoint.state import TrainerState
    from dstrain.training.restore import warm_schedule
    from dstrain.training.schedule import PlannedSchedule, stand_in_optimizer

    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 10, "total_num_steps": 101}
    spec = {"type": "WarmupDecayLR", "params": {**params, "warmup_type": "linear"}}
    start = PlannedSchedule(stand_in_optimizer(1e-3), spec)
    fresh = {"optimizer_step": 0, "global_steps": 0, "global_samples": 0, "param_group_lr": start.get_lr()}
    fresh["scheduler"] = start.state_dict()
    sched = warm_schedule(fresh, {"scheduler": spec}, TrainerState(step=5, samples=20))
    assert sched["scheduler"]["last_batch_iteration"] == 6
    assert sched["param_group_lr"] == [pytest.approx(6 / 10 * 1e-3)]


def test_a_snapshot_without_a_schema_version_keeps_the_text_as_0_1_0_read_it():
    """0.1.0 did not clean text; its run must resume on the same tokens. A fresh config is unaffected."""
    from dstrain.checkpoint.resume import keep_written_behaviour

    old = {"data": {"train": ["t.jsonl"]}}
    keep_written_behaviour(old)
    assert old["data"]["clean"] is False
    new = {"version": 1, "data": {"train": ["t.jsonl"]}}
    keep_written_behaviour(new)
    assert "clean" not in new["data"]
    explicit = {"data": {"clean": True}}
    keep_written_behaviour(explicit)
    assert explicit["data"]["clean"] is True
