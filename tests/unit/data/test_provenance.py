"""Data provenance: a cheap sampled fingerprint per training file, compared on resume and by inspect."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstrain.checkpoint.resume import check_same_data
from dstrain.checkpoint.state import TrainerState
from dstrain.data.provenance import BLOCK, changed_files, describe_files, file_status, fingerprint
from dstrain.errors import DataError


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_fingerprint_is_stable_and_sees_sampled_changes(tmp_path: Path):
    data = bytes(range(256)) * (4 * BLOCK // 256)
    path = write(tmp_path / "a.jsonl", data)
    first = fingerprint(path)
    assert first.startswith("sampled-sha256:") and fingerprint(path) == first
    for offset in (0, len(data) // 2, len(data) - 1):  # first, middle and last block
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        assert fingerprint(write(tmp_path / "b.jsonl", bytes(changed))) != first, offset
    assert fingerprint(write(tmp_path / "c.jsonl", data + b"\n")) != first  # the size is hashed too


class CountingReader:
    """A binary file that counts the bytes read through it."""

    def __init__(self, fh) -> None:
        self.fh, self.bytes_read = fh, 0

    def __enter__(self) -> CountingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def seek(self, offset: int) -> int:
        return self.fh.seek(offset)

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.bytes_read += len(data)
        return data


def test_fingerprint_of_a_huge_file_reads_three_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Counted in bytes, not timed: a time bound is a speed assert that a loaded machine breaks."""
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as fh:  # sparse: 100 GB long, nothing on disk
        fh.truncate(100 * 1024**3)
    readers: list[CountingReader] = []
    real_open = Path.open

    def counting_open(self: Path, *args, **kwargs) -> CountingReader:
        readers.append(CountingReader(real_open(self, *args, **kwargs)))
        return readers[-1]

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", counting_open)
        fingerprint(path)
    assert [reader.bytes_read for reader in readers] == [3 * BLOCK]


def test_describe_files_records_path_size_mtime_fingerprint(tmp_path: Path):
    write(tmp_path / "a.jsonl", b"{}\n")
    [record] = describe_files([str(tmp_path / "*.jsonl")])
    assert record["path"] == str(tmp_path / "a.jsonl") and record["size"] == 3
    assert record["mtime"] > 0 and record["fingerprint"] == fingerprint(tmp_path / "a.jsonl")


def test_changed_files_names_old_and_new_fingerprints(tmp_path: Path):
    path = write(tmp_path / "a.jsonl", b"old\n")
    saved = describe_files([str(path)])
    assert changed_files(saved, describe_files([str(path)])) == []
    assert changed_files([], describe_files([str(path)])) == []  # recorded before 0.2.0: nothing to compare
    old = saved[0]["fingerprint"]
    write(path, b"new!\n")
    [line] = changed_files(saved, describe_files([str(path)]))
    assert old in line and fingerprint(path) in line and "size 4" in line and "size 5" in line


def test_file_status(tmp_path: Path):
    path = write(tmp_path / "a.jsonl", b"x\n")
    [record] = describe_files([str(path)])
    assert file_status(record) == "matches"
    relative = {**record, "path": "a.jsonl"}
    assert file_status(relative, base=tmp_path) == "matches"
    write(path, b"y\n")
    assert file_status(record).startswith(f"changed ({record['fingerprint']} -> ")
    path.unlink()
    assert file_status(record) == "missing"


def test_resume_refuses_changed_data_with_both_fingerprints(tmp_path: Path):
    path = write(tmp_path / "a.jsonl", b'{"q": 1}\n')
    state = TrainerState(train_samples=1, data_files=describe_files([str(path)]))
    check_same_data(state, 1, describe_files([str(path)]))  # unchanged: no error
    old = state.data_files[0]["fingerprint"]
    write(path, b'{"q": 2}\n')
    with pytest.raises(DataError) as err:
        check_same_data(state, 1, describe_files([str(path)]))
    assert old in str(err.value) and fingerprint(path) in str(err.value)
    with pytest.raises(DataError, match="now yields 2 usable samples"):
        check_same_data(state, 2, describe_files([str(path)]))
