"""Data snapshots (dstrain.data.snapshot): what `link` and `copy` leave under the run dir, and how a resume
whose data changed is pointed at the snapshot, or refused when the snapshot changed with its source."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dstrain.checkpoint.resume import check_same_data
from dstrain.checkpoint.state import TrainerState
from dstrain.config.run import config_from_dict, load_config
from dstrain.data import snapshot
from dstrain.data.provenance import describe_files
from dstrain.errors import DataError, StorageError


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"a": 1}\n' * 50, encoding="utf-8")
    (data / "eval.jsonl").write_text('{"b": 2}\n' * 10, encoding="utf-8")
    return {"train": data / "train.jsonl", "eval": data / "eval.jsonl", "run": tmp_path / "run"}


def config(files: dict[str, Path], mode: str):
    return config_from_dict(
        {"data": {"train": [str(files["train"])], "eval": [str(files["eval"])], "snapshot": mode}}
    )


def taken(files: dict[str, Path], mode: str) -> dict:
    snap = snapshot.plan(config(files, mode), None)
    snapshot.take(files["run"], snap, say=lambda line: files.setdefault("said", line))
    return snap


def replace_file(path: Path, text: str) -> None:
    """Rewrite a file the way `dstrain convert` and most tools do: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def test_off_is_no_snapshot_and_yaml_off_reads_as_off(tmp_path, files):
    assert snapshot.plan(config(files, "off"), None) == {}
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{train: [{files['train']}], snapshot: off}}\ntrain: {{memory_check: off}}\n")
    cfg = load_config(path)  # YAML 1.1 hands over `off` as False
    assert (cfg.data.snapshot, cfg.train.memory_check) == ("off", "off")


def test_link_shares_the_bytes_and_says_the_hard_link_caveat(files):
    snap = taken(files, "link")
    train = files["run"] / snap["train"][0]["path"]
    assert train.name == "00-train.jsonl" and train.parent.name == "train"
    assert train.read_bytes() == files["train"].read_bytes()
    if train.stat().st_ino == files["train"].stat().st_ino:  # no reflink on this filesystem
        assert "hard links" in files["said"] and "edited in place changes its snapshot" in files["said"]
    assert all(snapshot.matches(files["run"], e) for e in snap["train"] + snap["eval"])


def test_copy_is_independent_of_its_source(files):
    snap = taken(files, "copy")
    train = files["run"] / snap["train"][0]["path"]
    assert train.stat().st_ino != files["train"].stat().st_ino
    files["train"].write_text("edited in place\n")
    assert snapshot.matches(files["run"], snap["train"][0])
    assert "said" not in files


def test_copy_checks_the_free_space_first(files, monkeypatch):
    usage = shutil.disk_usage(files["train"].parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: type(usage)(usage.total, usage.total - 100, 100))
    with pytest.raises(StorageError, match=r"data.snapshot=copy: .* take 540 B, but only 100 B is free"):
        taken(files, "copy")
    assert not (files["run"] / snapshot.SNAPSHOT_DIR).exists()


def resume_state(files: dict[str, Path], snap: dict) -> TrainerState:
    return TrainerState(
        train_samples=50, data_files=describe_files([str(files["train"])]), data_snapshot=snap
    )


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_a_changed_source_resumes_on_the_snapshot(files, mode):
    snap = taken(files, mode)
    state = resume_state(files, snap)
    cfg = config(files, mode)
    assert snapshot.redirect(cfg, state, files["run"], eval_overridden=False) == (cfg, None)  # unchanged
    replace_file(files["train"], '{"a": 3}\n' * 50)
    moved, note = snapshot.redirect(cfg, state, files["run"], eval_overridden=False)
    assert moved.data.train == [str(files["run"] / snap["train"][0]["path"])]
    assert moved.data.eval == cfg.data.eval  # the eval file did not change
    assert note.startswith(f"data.train changed since the run began ({files['train']}: fingerprint")
    assert note.endswith(
        f"resuming on the run's data snapshot in {files['run'] / 'data_snapshot'} (data.snapshot={mode})"
    )
    check_same_data(state, 50, describe_files(moved.data.train))  # the position means the same samples


def test_without_a_snapshot_a_changed_source_is_refused_as_before(files):
    state = resume_state(files, {})
    cfg = config(files, "off")
    replace_file(files["train"], '{"a": 3}\n' * 50)
    assert snapshot.redirect(cfg, state, files["run"], eval_overridden=False) == (cfg, None)
    with pytest.raises(
        DataError, match=r"data.train changed since the checkpoint.*Restore the original files"
    ):
        check_same_data(state, 50, describe_files(cfg.data.train))


def test_a_hard_link_edited_in_place_is_refused(files):
    snap = taken(files, "link")
    if (files["run"] / snap["train"][0]["path"]).stat().st_ino != files["train"].stat().st_ino:
        pytest.skip("this filesystem made a reflink: an in-place edit leaves the snapshot as it was")
    state = resume_state(files, snap)
    files["train"].write_text('{"a": 3}\n' * 50)  # in place: the hard link changes too
    with pytest.raises(
        DataError, match=r"data.train changed since the checkpoint .* and so did its snapshot"
    ):
        snapshot.redirect(config(files, "link"), state, files["run"], False)


def test_a_resume_keeps_its_snapshot_or_takes_one_when_asked(files):
    recorded = snapshot.plan(config(files, "link"), None)
    assert snapshot.plan(config(files, "off"), recorded) is recorded  # --set data.snapshot=off keeps it
    taken_now = snapshot.plan(config(files, "copy"), {})  # a run without one, resumed with copy
    assert taken_now["mode"] == "copy" and [e["source"] for e in taken_now["train"]] == [str(files["train"])]
