"""A write that fails for lack of space or for permission becomes one message with the path, the bytes needed
and free, and what to do (dstrain.storage); any other failure passes through as it was."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError

from dstrain import storage
from dstrain.checkpoint.layout import checkpoints_dir, write_latest
from dstrain.errors import StorageError
from tests.diskfull import tmpfs


def test_the_errnos_of_space_and_permission_failures_are_recognised():
    assert storage.storage_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert storage.storage_errno(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
    assert storage.storage_errno(PermissionError(errno.EACCES, "Permission denied")) == errno.EACCES
    assert storage.storage_errno(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    # safetensors says it in Rust's words, not as an OSError
    text = "Error while serializing: I/O error: No space left on device (os error 28)"
    assert storage.storage_errno(SafetensorError(text)) == errno.ENOSPC
    assert storage.storage_errno(FileNotFoundError(errno.ENOENT, "gone")) is None
    assert storage.storage_errno(ValueError("(os error 2)")) is None  # ENOENT is not a space problem


def test_a_full_disk_in_the_run_dir_says_path_sizes_fixes_and_the_intact_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    checkpoints_dir(run_dir).mkdir(parents=True)
    write_latest(checkpoints_dir(run_dir), "step-00000004")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: type(usage)(usage.total, usage.total - 2048, 2048))
    target = checkpoints_dir(run_dir) / "step-00000006"
    with (
        pytest.raises(StorageError) as info,
        storage.guard(storage.run_place(run_dir), "checkpoint", target, 3 << 20),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(info.value)
    assert "\n" not in message  # one line
    assert f"no space left on the device (ENOSPC) writing checkpoint {target}" in message
    assert "it needs about 3.0 MiB, 2.0 KiB is free on the filesystem of" in message
    assert "lower train.keep_last" in message and "move output_dir" in message
    assert f"step-00000004, is intact: `dstrain resume {run_dir}`" in message


def test_a_read_only_cache_names_dstrain_cache_dir(tmp_path):
    with (
        pytest.raises(
            StorageError, match=r"read-only \(EROFS\) writing the data index cache .*DSTRAIN_CACHE_DIR"
        ),
        storage.guard(storage.cache_place(tmp_path), "the data index cache", tmp_path / "entry"),
    ):
        raise OSError(errno.EROFS, "Read-only file system")


def test_other_failures_pass_through_unchanged(tmp_path):
    place = storage.run_place(tmp_path)
    with pytest.raises(NotADirectoryError), storage.guard(place, "metrics", tmp_path / "metrics.jsonl"):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory")


def test_a_real_read_only_filesystem(tmp_path):
    expected = r"read-only \(EROFS\) writing metrics .*make .* writable"
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as ro:
        guarded = storage.guard(storage.run_place(ro), "metrics", ro / "metrics.jsonl")
        with pytest.raises(StorageError, match=expected), guarded:
            (ro / "metrics.jsonl").write_text("x")


def test_free_bytes_looks_at_the_nearest_existing_parent(tmp_path, monkeypatch):
    # The filesystem's free space moves while other tests write, so the probe is recorded, not compared live.
    asked = []
    usage = shutil.disk_usage(tmp_path)

    def recording(path):
        asked.append(Path(path))
        return type(usage)(usage.total, usage.used, 12345)

    monkeypatch.setattr(shutil, "disk_usage", recording)
    assert storage.free_bytes(tmp_path / "not" / "yet") == 12345
    assert asked == [tmp_path]


def test_human_sizes():
    assert [storage.human(n) for n in (512, 1536, 5 << 20, 3 << 30)] == [
        "512 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]
