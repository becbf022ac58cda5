"""The per-file index: cached, invalidated when the file changes, the same for JSONL and Parquet."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dstrain.data import index as index_mod
from dstrain.data.index import cache_root, index_file, iter_bad
from dstrain.data.stream import Corpus
from dstrain.errors import DataError
from tests.unit.data.loaded import load_records

SFT = {"query": "q?", "retrieval_result": ["p1", "p2"], "answer": "a"}


def rows(n: int) -> list[dict]:
    return [dict(SFT, query=f"question {i} 中文?", answer=f"answer {i}") for i in range(n)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DSTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    return cache_root()


def test_second_open_reads_the_cache_without_scanning(write_jsonl, cache, monkeypatch):
    path = write_jsonl([*rows(5), "{bad"])
    first = index_file(path, "sft-rag")
    assert (len(first), first.num_bad) == (5, 1)
    monkeypatch.setattr(index_mod, "scan_file", lambda *a, **k: pytest.fail("scanned again"))
    again = index_file(path, "sft-rag")
    assert isinstance(again.offsets, np.memmap)  # mapped, not read into memory
    assert np.array_equal(again.offsets, first.offsets) and np.array_equal(again.lines, first.lines)
    assert again.bad == first.bad and again.num_bad == 1


def test_a_changed_file_is_indexed_again(write_jsonl, cache):
    path = write_jsonl(rows(5))
    assert len(index_file(path, "sft-rag")) == 5
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(SFT) + "\n")
    assert len(index_file(path, "sft-rag")) == 6
    # same size, new content: the mtime tells
    path.write_text(path.read_text().replace('"a"', '"b"', 1))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert Corpus([index_file(path, "sft-rag")]).read(5).answer == "b"


def test_a_damaged_cache_entry_is_rebuilt(write_jsonl, cache):
    path = write_jsonl(rows(4))
    index_file(path, "sft-rag")
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    (entry / "offsets.npy").write_bytes(b"garbage")
    assert len(index_file(path, "sft-rag")) == 4


def test_each_format_has_its_own_entry(write_jsonl, cache):
    path = write_jsonl(rows(3))
    assert len(index_file(path, "sft-rag")) == 3
    as_messages = index_file(path, "messages")
    assert (len(as_messages), as_messages.num_bad) == (0, 3)


def test_an_unwritable_cache_costs_time_not_the_run(write_jsonl, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("DSTRAIN_CACHE_DIR", str(blocker))
    path = write_jsonl(rows(3))
    assert len(index_file(path, "sft-rag")) == 3
    assert "indexing in memory" in capsys.readouterr().err


def test_many_bad_records_are_all_reported_from_the_cache(write_jsonl, cache, monkeypatch):
    monkeypatch.setattr(index_mod, "KEPT_BAD", 3)
    path = write_jsonl(["{bad"] * 10 + [SFT])
    built = index_file(path, "sft-rag")
    assert (len(built.bad), built.num_bad) == (3, 10)
    assert [b.line for b in iter_bad(built)] == list(range(1, 11))
    assert [b.line for b in iter_bad(index_file(path, "sft-rag"))] == list(range(1, 11))


def test_a_file_changed_under_a_running_job_is_a_clear_error(write_jsonl, cache):
    path = write_jsonl(rows(3))
    corpus = Corpus([index_file(path, "sft-rag")])
    path.write_text("x" * 10)
    with pytest.raises(DataError, match=r"data\.jsonl:1: short read.*changed during the run"):
        corpus.read(0)
    from dstrain.config.run import DataConfig
    from dstrain.data.loader import TokenizedCorpus

    bad = TokenizedCorpus(corpus, None, DataConfig())[1]  # in a worker: returned, not raised
    assert bad.fatal and bad.line == 2 and "changed during the run" in bad.reason


def test_parallel_ranges_cut_only_at_line_starts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\r\n" for r in rows(101)))
    for parts in (2, 3, 7, 50):
        points = index_mod.split_points(str(path), parts)
        data = path.read_bytes()
        assert points[0] == 0 and points[-1] == len(data)
        assert all(data[p - 1 : p] == b"\n" for p in points[1:-1])
    index = index_mod.scan_jsonl(str(path), "sft-rag", workers=4, min_parallel_bytes=0)
    assert index.lines.tolist() == list(range(1, 102))
    assert [r.query for r in map(Corpus([index]).read, range(101))] == [r["query"] for r in rows(101)]


# ----------------------------------------------------------------------------------------------- Parquet


def write_parquet(path: Path, records: list[dict], row_group_size: int) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def test_parquet_reads_the_same_records_as_jsonl(write_jsonl, tmp_path, cache):
    records = rows(23)
    jsonl = load_records([write_jsonl(records)], "sft-rag").records
    parquet = Corpus([index_file(write_parquet(tmp_path / "d.parquet", records, 5), "sft-rag")])
    assert len(parquet) == 23
    order = [17, 0, 22, 5, 4, 11, 3]  # across row groups, back and forth
    assert [parquet.read(i) for i in order] == [jsonl[i] for i in order]
    assert parquet.origin(22) == (str(tmp_path / "d.parquet"), 23)


def test_parquet_bad_rows_are_reported_by_row(tmp_path, cache):
    records = [*rows(3), dict(SFT, answer=""), {"query": "q", "retrieval_result": ["p"], "answer": None}]
    path = write_parquet(tmp_path / "d.parquet", records, 2)
    index = index_file(path, "sft-rag")
    assert len(index) == 3
    assert [str(b) for b in index.bad] == [
        f"{path}:4: field 'answer' is empty",
        f"{path}:5: field 'answer' must be a string, got NoneType",
    ]
    missing_column = index_file(write_parquet(tmp_path / "m.parquet", [{"query": "q"}], 1), "sft-rag")
    assert [b.reason for b in missing_column.bad] == ["missing field 'retrieval_result'"]


def test_a_broken_parquet_file_is_one_data_error(tmp_path, cache):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot be read as a Parquet file"):
        index_file(path, "sft-rag")
