"""Atomic directories, manifest verification, the `latest` pointer, pruning and stale temp cleanup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dstrain.checkpoint.atomic import TMP_PREFIX, atomic_dir, write_text_atomic
from dstrain.checkpoint.layout import (
    MANIFEST,
    build_manifest,
    checkpoints_dir,
    list_checkpoints,
    prune,
    read_latest,
    remove_stale_temp,
    sha256_file,
    step_name,
    verify_checkpoint,
    write_latest,
)

FILES = {"adapter_model.safetensors": b"\x00\x01weights" * 100, "trainer_state.json": b'{"step": 3}'}


def temps(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]


def make_checkpoint(directory: Path, files: dict[str, bytes] = FILES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / MANIFEST).write_text(json.dumps(build_manifest(directory)), encoding="utf-8")
    return directory


def test_step_names_and_paths(tmp_path: Path):
    assert step_name(120) == "step-00000120"
    assert step_name(0) == "step-00000000"
    assert checkpoints_dir(tmp_path) == tmp_path / "checkpoints"


# -------------------------------------------------------------------------------------------- atomic


def test_atomic_dir_success(tmp_path: Path):
    final = tmp_path / "step-00000001"
    with atomic_dir(final) as tmp:
        assert tmp != final and tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX)
        assert not final.exists()
        (tmp / "a.txt").write_text("hello", encoding="utf-8")
    assert final.is_dir()
    assert (final / "a.txt").read_text(encoding="utf-8") == "hello"
    assert temps(tmp_path) == []


def test_atomic_dir_replaces_an_existing_dir_whole(tmp_path: Path):
    final = tmp_path / "step-00000001"
    final.mkdir()
    (final / "old.txt").write_text("old", encoding="utf-8")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new", encoding="utf-8")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert temps(tmp_path) == []


def test_atomic_dir_failure_leaves_existing_content_untouched(tmp_path: Path):
    final = tmp_path / "step-00000001"
    final.mkdir()
    (final / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_dir(final) as tmp:
        (tmp / "old.txt").write_text("half-written", encoding="utf-8")
        (tmp / "new.txt").write_text("new", encoding="utf-8")
        raise RuntimeError("disk on fire")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert (final / "old.txt").read_text(encoding="utf-8") == "old"
    assert temps(tmp_path) == []


def test_atomic_dir_failure_without_existing_dir(tmp_path: Path):
    final = tmp_path / "step-00000002"
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "x").write_bytes(b"x")
        raise KeyboardInterrupt
    assert not final.exists()
    assert temps(tmp_path) == []


def test_atomic_dir_clears_a_leftover_temp_of_the_same_pid(tmp_path: Path):
    final = tmp_path / "step-00000003"
    leftover = tmp_path / f"{TMP_PREFIX}{final.name}.{os.getpid()}"
    leftover.mkdir()
    (leftover / "junk").write_bytes(b"junk")
    with atomic_dir(final) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "ok").write_bytes(b"ok")
    assert sorted(p.name for p in final.iterdir()) == ["ok"]
    assert temps(tmp_path) == []


def test_atomic_dir_failed_rename_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    final = tmp_path / "step-00000001"
    final.mkdir()
    (final / "old.txt").write_text("old", encoding="utf-8")
    real_rename, real_replace = os.rename, os.replace

    failures = [1]  # one rename into place fails (a crash there); the restore that follows may succeed

    def failing(real):
        def move(src, dst, *args, **kwargs):
            if Path(dst) == final and Path(src).name.startswith(TMP_PREFIX) and failures:
                failures.pop()
                raise OSError("simulated crash at the rename")
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    with pytest.raises(OSError, match="simulated"), atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new", encoding="utf-8")
    assert (final / "old.txt").read_text(encoding="utf-8") == "old"


def test_write_text_atomic(tmp_path: Path):
    target = tmp_path / "latest"
    write_text_atomic(target, "a\n")
    write_text_atomic(target, "b\n")
    assert target.read_text(encoding="utf-8") == "b\n"
    assert temps(tmp_path) == []


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_lists_every_other_file_with_sha_and_size(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "step-00000003")
    (ckpt / "sub").mkdir()  # directories are not listed
    manifest = build_manifest(ckpt)
    assert manifest["format"] == "dstrain-checkpoint/2"
    assert sorted(manifest["files"]) == sorted(FILES)
    for name, data in FILES.items():
        entry = manifest["files"][name]
        assert entry["size"] == len(data)
        assert entry["sha256"] == sha256_file(ckpt / name)
    assert len(manifest["files"]["trainer_state.json"]["sha256"]) == 64
    assert verify_checkpoint(ckpt) == []


def test_verify_detects_a_flipped_byte(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "step-00000003")
    path = ckpt / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_checkpoint(ckpt)
    assert problems == [f"{path}: sha256 does not match the manifest"]


def test_verify_detects_a_truncated_file(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "step-00000003")
    path = ckpt / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    problems = verify_checkpoint(ckpt)
    size = len(FILES["adapter_model.safetensors"])
    assert problems == [f"{path}: size {size - 10} != {size} in the manifest"]


def test_verify_detects_a_missing_file(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "step-00000003")
    (ckpt / "trainer_state.json").unlink()
    assert verify_checkpoint(ckpt) == [f"{ckpt / 'trainer_state.json'}: missing"]


def test_verify_reports_every_problem(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "step-00000003")
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "adapter_model.safetensors").write_bytes(b"")
    assert len(verify_checkpoint(ckpt)) == 2


def test_verify_detects_a_missing_manifest(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "step-00000003")
    (ckpt / MANIFEST).unlink()
    (problem,) = verify_checkpoint(ckpt)
    assert problem.startswith(f"{ckpt / MANIFEST}: missing")


def test_verify_detects_an_unreadable_manifest(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "step-00000003")
    (ckpt / MANIFEST).write_text('{"files": ', encoding="utf-8")
    assert verify_checkpoint(ckpt) == [f"{ckpt / MANIFEST}: unreadable manifest"]
    (ckpt / MANIFEST).write_text('{"format": "x"}', encoding="utf-8")
    assert verify_checkpoint(ckpt) == [f"{ckpt / MANIFEST}: unreadable manifest"]


def test_verify_of_a_missing_directory(tmp_path: Path):
    assert verify_checkpoint(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a directory"]


# --------------------------------------------------------------------------------------- latest/prune


def test_write_and_read_latest(tmp_path: Path):
    assert read_latest(tmp_path) is None
    write_latest(tmp_path, "step-00000010")
    assert (tmp_path / "latest").read_text(encoding="utf-8") == "step-00000010\n"
    assert read_latest(tmp_path) == "step-00000010"
    write_latest(tmp_path, "step-00000020")
    assert read_latest(tmp_path) == "step-00000020"
    assert temps(tmp_path) == []
    (tmp_path / "latest").write_text("  \n", encoding="utf-8")
    assert read_latest(tmp_path) is None


def _steps(root: Path, steps: list[int]) -> None:
    for step in steps:
        make_checkpoint(root / step_name(step))


def test_list_checkpoints_sorted_and_only_step_dirs(tmp_path: Path):
    _steps(tmp_path, [30, 5, 120, 10])
    (tmp_path / f"{TMP_PREFIX}step-00000200.123").mkdir()
    (tmp_path / "step-7").mkdir()
    (tmp_path / "latest").write_text("step-00000120\n", encoding="utf-8")
    assert [p.name for p in list_checkpoints(tmp_path)] == [step_name(s) for s in (5, 10, 30, 120)]
    assert list_checkpoints(tmp_path / "missing") == []


def test_prune_keeps_the_newest(tmp_path: Path):
    _steps(tmp_path, [10, 20, 30, 40, 50])
    removed = prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == [step_name(s) for s in (10, 20, 30)]
    assert [p.name for p in list_checkpoints(tmp_path)] == [step_name(40), step_name(50)]
    assert prune(tmp_path, keep_last=2) == []


def test_prune_never_removes_a_protected_checkpoint(tmp_path: Path):
    _steps(tmp_path, [10, 20, 30, 40, 50])
    removed = prune(tmp_path, keep_last=1, protect={step_name(20)})
    assert [p.name for p in removed] == [step_name(s) for s in (10, 30, 40)]
    assert [p.name for p in list_checkpoints(tmp_path)] == [step_name(20), step_name(50)]


def test_prune_with_fewer_than_keep_last(tmp_path: Path):
    _steps(tmp_path, [10, 20])
    assert prune(tmp_path, keep_last=3) == []
    assert len(list_checkpoints(tmp_path)) == 2


def test_prune_leaves_temp_dirs_and_latest_alone(tmp_path: Path):
    _steps(tmp_path, [10, 20, 30])
    (tmp_path / f"{TMP_PREFIX}step-00000040.7").mkdir()
    write_latest(tmp_path, step_name(30))
    prune(tmp_path, keep_last=1)
    assert (tmp_path / f"{TMP_PREFIX}step-00000040.7").is_dir()
    assert read_latest(tmp_path) == step_name(30)


def test_remove_stale_temp(tmp_path: Path):
    _steps(tmp_path, [10])
    stale_dir = tmp_path / f"{TMP_PREFIX}step-00000020.4242"
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"partial")
    stale_file = tmp_path / f"{TMP_PREFIX}latest.4242"
    stale_file.write_text("step-00000020\n", encoding="utf-8")
    write_latest(tmp_path, step_name(10))
    removed = remove_stale_temp(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", step_name(10)]
    assert verify_checkpoint(tmp_path / step_name(10)) == []
    assert remove_stale_temp(tmp_path / "missing") == []
