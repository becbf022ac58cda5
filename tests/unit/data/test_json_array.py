"""JSON array files: streamed element by element, indexed like JSONL lines, problems named by element and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain.data import json_array, records
from dstrain.data.index import index_file, iter_bad, scan_file
from dstrain.data.json_array import iter_elements, sniff
from dstrain.data.stream import Corpus
from dstrain.errors import DataError
from tests.unit.data.loaded import load_records

SFT = {"query": "q?", "retrieval_result": ["p1", "p2"], "answer": "a"}


def rows(n: int) -> list[dict]:
    return [dict(SFT, query=f"question {i} 渭河?", answer=f"answer {i}") for i in range(n)]


def write_array(tmp_path: Path, items: list, name: str = "data.json", indent: int | None = 2, **kw) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(items, ensure_ascii=False, indent=indent), encoding="utf-8", **kw)
    return path


def test_elements_carry_exact_byte_ranges_and_lines(tmp_path):
    path = write_array(tmp_path, rows(5))
    raw = path.read_bytes()
    elements = list(iter_elements(path, records.MAX_RECORD_BYTES))
    assert [e.number for e in elements] == list(range(5)) and all(e.error is None for e in elements)
    for element, expected in zip(elements, rows(5), strict=True):
        piece = raw[element.offset : element.offset + element.length]
        assert json.loads(piece) == expected == element.value
        assert raw[: element.offset].count(b"\n") + 1 == element.line


def test_small_chunks_split_values_numbers_and_multibyte_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(json_array, "CHUNK", 7)  # every element, string and character cut somewhere
    items = [*rows(6), {"n": 1234567890123}, "ü" * 10]
    path = write_array(tmp_path, items, indent=None)
    assert [e.value for e in iter_elements(path, 10_000)] == items


def test_index_and_corpus_read_an_array_like_jsonl(tmp_path):
    path = write_array(tmp_path, rows(40), indent=4)
    index = index_file(path, "sft-rag")
    assert (len(index), index.num_bad) == (40, 0)
    corpus = Corpus([index])
    assert [corpus.read(i).answer for i in range(40)] == [f"answer {i}" for i in range(40)]
    assert load_records([path], "sft-rag").records == [corpus.read(i) for i in range(40)]


def test_bad_elements_name_their_index_and_line(tmp_path):
    items = [SFT, {"query": "q?"}, SFT, 7]
    path = write_array(tmp_path, items)
    bad = list(iter_bad(scan_file(str(path), "sft-rag")))
    assert [str(b) for b in bad] == [
        f"{path}:10: element 1: missing field 'retrieval_result'",
        f"{path}:21: element 3: expected a JSON object, got int",
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            '[{"query": "q", "retrieval_result": [], "answer": "a"}, {"query": "tru',
            "element 1: the file ends inside",
        ),
        ('[{"query": "q", "retrieval_result": [], "answer": "a"},', "element 1: the file ends inside"),
        ('[{"query": "q", "retrieval_result": [], "answer": "a"}', "after element 0: expected ',' or ']'"),
        ('[{"query": "q", "retrieval_result": [], "answer": "a"}, {"a" 1}, {}]', "element 1: invalid JSON"),
        ('[{"query": "q", "retrieval_result": [], "answer": "a"}] []', "extra data after the array"),
    ],
)
def test_truncated_or_broken_arrays_keep_the_good_elements(tmp_path, text, reason):
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    index = scan_file(str(path), "sft-rag")
    assert len(index) == 1 and index.num_bad == 1
    assert reason in index.bad[0].reason


def test_bom_crlf_and_non_utf8_bytes(tmp_path):
    path = tmp_path / "bom.json"
    text = json.dumps(rows(3), ensure_ascii=False, indent=2).replace("\n", "\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    index = index_file(path, "sft-rag")
    assert (len(index), index.num_bad) == (3, 0)
    assert Corpus([index]).read(2).query == "question 2 渭河?"
    broken = tmp_path / "latin1.json"
    broken.write_bytes(
        b'[{"query": "caf\xe9", "retrieval_result": [], "answer": "a"}, ' + json.dumps(SFT).encode() + b"]"
    )
    bad = scan_file(str(broken), "sft-rag")
    assert len(bad) == 1 and bad.bad[0].reason == "element 0: undecodable bytes (not UTF-8)"


def test_over_long_elements_are_skipped_without_holding_them(tmp_path, monkeypatch):
    monkeypatch.setattr(json_array, "CHUNK", 64)
    huge = dict(SFT, answer='x"\\' * 400, retrieval_result=["[{" * 200])
    path = write_array(tmp_path, [SFT, huge, SFT], indent=None)
    elements = list(iter_elements(path, 500))
    assert [e.error is None for e in elements] == [True, False, True]
    assert "over the 500-byte limit" in elements[1].error
    assert elements[1].length == len(json.dumps(huge, ensure_ascii=False).encode())


def test_sniff_tells_arrays_lines_and_neither(tmp_path):
    assert sniff(write_array(tmp_path, rows(2))) == "array"
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in rows(2)), encoding="utf-8")
    assert sniff(lines) == "lines" and len(index_file(lines, "sft-rag")) == 2
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"data": rows(2)}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"neither a JSON array of records nor JSON Lines.*jq -c"):
        index_file(nested, "sft-rag")


def test_empty_array_holds_no_records(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[ ]\n", encoding="utf-8")
    index = scan_file(str(path), "sft-rag")
    assert (len(index), index.num_bad) == (0, 0)


@pytest.mark.parametrize("tail", ["},\n]", "}, ]\n"])
def test_a_trailing_comma_at_the_end_is_a_syntax_error_not_a_truncation(tmp_path, tail):
    path = tmp_path / "comma.json"
    path.write_text('[{"query": "q", "retrieval_result": [], "answer": "a"' + tail, encoding="utf-8")
    index = scan_file(str(path), "sft-rag")
    assert len(index) == 1 and index.num_bad == 1
    assert "ends inside" not in index.bad[0].reason, index.bad[0].reason


def test_a_json_lines_file_with_a_first_line_longer_than_the_sniffed_head(tmp_path):
    """Records with long passages: the first line alone can exceed what sniff reads; still JSON Lines."""
    record = {"query": "q", "retrieval_result": ["x" * (json_array.SNIFF_BYTES + 10)], "answer": "a"}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    assert sniff(path) == "lines"
