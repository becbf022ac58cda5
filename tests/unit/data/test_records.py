"""Record formats of SPEC section 2: every bad record is `path:line: reason`, good ones are kept as-is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain.data import records
from dstrain.data.index import scan_jsonl
from dstrain.data.records import (
    BadRecord,
    MessagesRecord,
    RagRecord,
    expand_paths,
    read_file,
)
from dstrain.data.stream import Corpus
from dstrain.errors import DataError
from tests.unit.data.loaded import enforce_policy, load_records

SFT = {"query": "Where does the river Diazei end?", "retrieval_result": ["p1", "p2"], "answer": "Lake Rorosk"}
PREF = {"query": "q?", "retrieval_result": ["p1"], "chosen": {"text": "good"}, "rejected": {"text": "bad"}}
MSGS = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _load(path: Path, fmt: str):
    """The eager reader's result, checked against the streaming index and its random-access reader."""
    loaded = load_records([path], fmt)
    for workers in (1, 3):
        index = scan_jsonl(str(path), fmt, workers, min_parallel_bytes=0)  # 3 byte ranges even for tiny files
        assert index.bad == loaded.bad
        assert [(str(path), int(line)) for line in index.lines] == loaded.origins
        corpus = Corpus([index])
        assert [corpus.read(i) for i in range(len(corpus))] == loaded.records
    return loaded


def _bad_lines(path: Path, fmt: str) -> list[str]:
    return [str(b) for b in _load(path, fmt).bad]


def _one_bad(write_jsonl, bad_line, fmt: str = "sft-rag", good=SFT) -> tuple[Path, str]:
    """Good record, blank line, the bad one (line 3), then a good one: returns the single report."""
    path = write_jsonl([good, "", bad_line, good])
    loaded = _load(path, fmt)
    assert len(loaded.records) == 2
    assert [line for _, line in loaded.origins] == [1, 4]
    assert len(loaded.bad) == 1
    return path, str(loaded.bad[0])


# --------------------------------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"query": "q", "retrieval_result": [], "answer": "a"', "invalid JSON (Expecting ',' delimiter"),
        ("not json at all", "invalid JSON (Expecting value at column 1)"),
        ("[1, 2]", "expected a JSON object, got list"),
        ({"retrieval_result": ["p"], "answer": "a"}, "missing field 'query'"),
        ({"query": "q", "answer": "a"}, "missing field 'retrieval_result'"),
        ({"query": "q", "retrieval_result": ["p"]}, "missing field 'answer'"),
        ({"query": 3, "retrieval_result": ["p"], "answer": "a"}, "field 'query' must be a string, got int"),
        (
            {"query": "q", "retrieval_result": "p", "answer": "a"},
            "field 'retrieval_result' must be a list of strings, got str",
        ),
        (
            {"query": "q", "retrieval_result": ["p", 7], "answer": "a"},
            "retrieval_result[1] must be a string, got int",
        ),
        (
            {"query": "q", "retrieval_result": ["p"], "answer": None},
            "field 'answer' must be a string, got NoneType",
        ),
        ({"query": "  ", "retrieval_result": ["p"], "answer": "a"}, "field 'query' is empty"),
        ({"query": "q", "retrieval_result": ["p"], "answer": ""}, "field 'answer' is empty"),
    ],
)
def test_sft_rag_bad_records(write_jsonl, bad_line, reason: str):
    path, report = _one_bad(write_jsonl, bad_line)
    assert report.startswith(f"{path}:3: {reason}"), report


def test_report_format_is_exactly_path_line_reason(write_jsonl):
    path, report = _one_bad(write_jsonl, {"query": 3, "retrieval_result": ["p"], "answer": "a"})
    assert report == f"{path}:3: field 'query' must be a string, got int"


def test_undecodable_bytes(write_jsonl):
    bad = b'{"query": "caf\xe9", "retrieval_result": [], "answer": "a"}'
    path, report = _one_bad(write_jsonl, bad)
    assert report == f"{path}:3: undecodable bytes (not UTF-8) at byte 14"


def test_over_long_record(write_jsonl, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 200)
    long = dict(SFT, answer="x" * 300)
    path, report = _one_bad(write_jsonl, long)
    size = len(json.dumps(long).encode()) + 1  # the line as read, with its newline
    assert report == f"{path}:3: record is {size} bytes, over the 200-byte limit"


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (
            {"query": "q", "retrieval_result": ["p"], "chosen": {}, "rejected": "b"},
            "chosen: missing field 'text'",
        ),
        (
            {"query": "q", "retrieval_result": ["p"], "chosen": "a", "rejected": {"txt": "b"}},
            "rejected: missing field 'text'",
        ),
        (
            {"query": "q", "retrieval_result": ["p"], "chosen": {"text": 1}, "rejected": "b"},
            "chosen: field 'text' must be a string, got int",
        ),
        (
            {"query": "q", "retrieval_result": ["p"], "chosen": {"text": " "}, "rejected": "b"},
            "chosen: field 'text' is empty",
        ),
        (
            {"query": "q", "retrieval_result": ["p"], "chosen": ["a"], "rejected": "b"},
            "field 'chosen' must be a string",
        ),
        ({"query": "q", "retrieval_result": ["p"], "chosen": "a"}, "missing field 'rejected'"),
    ],
)
def test_preference_bad_records(write_jsonl, bad_line, reason: str):
    path, report = _one_bad(write_jsonl, bad_line, "preference", PREF)
    assert report.startswith(f"{path}:3: {reason}"), report


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ({"messages": []}, "field 'messages' must be a non-empty list of {role, content}"),
        ({"msgs": []}, "field 'messages' must be a non-empty list of {role, content}"),
        ({"messages": ["hi"]}, "messages[0] must be an object with role and content"),
        (
            {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages[0].role must be one of system, user, assistant, got 'bot'",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn to train on"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]},
            "messages[1].content must be a string, got int",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
            "messages[1].content is empty",
        ),
    ],
)
def test_messages_bad_records(write_jsonl, bad_line, reason: str):
    path, report = _one_bad(write_jsonl, bad_line, "messages", MSGS)
    assert report == f"{path}:3: {reason}"


def test_every_bad_line_is_reported_with_its_own_number(write_jsonl):
    path = write_jsonl(["", SFT, "{oops", "", "", {"query": "q"}, SFT, b"\xff\xfe", ""])
    loaded = _load(path, "sft-rag")
    assert [b.line for b in loaded.bad] == [3, 6, 8]
    assert all(b.path == str(path) for b in loaded.bad)
    assert [line for _, line in loaded.origins] == [2, 7]
    assert loaded.seen == 5


# -------------------------------------------------------------------------------------- good records


def test_sft_rag_record_is_parsed(write_jsonl):
    loaded = _load(write_jsonl([SFT]), "sft-rag")
    assert loaded.bad == []
    assert loaded.records == [RagRecord("Where does the river Diazei end?", ("p1", "p2"), "Lake Rorosk")]


def test_utf8_bom_crlf_and_blank_lines(write_jsonl):
    path = write_jsonl(["", SFT, "   ", SFT], newline="\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    loaded = _load(path, "sft-rag")
    assert loaded.bad == []
    assert [line for _, line in loaded.origins] == [2, 4]
    assert loaded.records[0].answer == "Lake Rorosk"  # no stray "\r"


def test_bom_on_the_first_record_line(write_jsonl):
    path = write_jsonl([SFT, "{bad"], newline="\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    loaded = _load(path, "sft-rag")
    assert len(loaded.records) == 1
    assert [str(b).split(": ", 1)[0] for b in loaded.bad] == [f"{path}:2"]


def test_chinese_and_other_non_ascii_text_is_kept_exactly(write_jsonl):
    rec = {
        "query": "渭河流入哪条河？",
        "retrieval_result": ["渭河是黄河的最大支流。", "Ünïcödé — ✓ 😀"],
        "answer": "黄河\u3000（Yellow River）",
    }
    loaded = _load(write_jsonl([rec]), "sft-rag")
    assert loaded.records == [RagRecord(rec["query"], tuple(rec["retrieval_result"]), rec["answer"])]


def test_line_separator_characters_inside_strings_do_not_split_records(write_jsonl):
    rec = dict(SFT, answer="a\u2028b\u0085c")
    loaded = _load(write_jsonl([rec, SFT]), "sft-rag")
    assert loaded.bad == []
    assert loaded.records[0].answer == "a\u2028bc"  # NEL is a C1 control character: cleaning drops it
    raw = [rec for _, rec in read_file(write_jsonl([rec]), "sft-rag", clean=False)]
    assert raw[0].answer == "a\u2028b\u0085c"
    assert [line for _, line in loaded.origins] == [1, 2]


def test_extra_fields_are_ignored(write_jsonl):
    loaded = _load(write_jsonl([dict(SFT, id=7, score=[1, 2], meta={"x": None})]), "sft-rag")
    assert loaded.bad == []
    assert loaded.records[0] == RagRecord(SFT["query"], ("p1", "p2"), SFT["answer"])


def test_preference_chosen_rejected_as_dicts_and_plain_strings(write_jsonl):
    plain = {"query": "q?", "retrieval_result": ["p1"], "chosen": "good", "rejected": "bad", "extra": 1}
    mixed = {
        "query": "q?",
        "retrieval_result": ["p1"],
        "chosen": {"text": "good", "score": 1},
        "rejected": "bad",
    }
    loaded = _load(write_jsonl([PREF, plain, mixed]), "preference")
    assert loaded.bad == []
    expected = RagRecord("q?", ("p1",), "good", "bad")
    assert loaded.records == [expected, expected, expected]


def test_messages_record_is_parsed(write_jsonl):
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "Hello"},
        ],
        "id": "x",
    }
    loaded = _load(write_jsonl([rec]), "messages")
    assert loaded.records == [
        MessagesRecord((("system", "Be brief."), ("user", "你好"), ("assistant", "Hello")))
    ]


def test_empty_passages_are_dropped_but_allowed(write_jsonl):
    loaded = _load(
        write_jsonl([dict(SFT, retrieval_result=["", "p", "  "]), dict(SFT, retrieval_result=[])]), "sft-rag"
    )
    assert loaded.bad == []
    assert [r.passages for r in loaded.records] == [("p",), ()]


def test_bundled_sample_data_is_clean():
    root = Path(records.__file__).parent.parent / "assets" / "data"
    for name, fmt in [
        ("sft_rag_train.jsonl", "sft-rag"),
        ("preference_train.jsonl", "preference"),
        ("messages_train.jsonl", "messages"),
    ]:
        loaded = load_records([root / name], fmt)
        assert loaded.bad == [], loaded.bad[:3]
        assert len(loaded.records) > 100


# ------------------------------------------------------------------------------------------- policy


def _mixed(write_jsonl, good: int, bad_lines: list[int]) -> tuple[Path, records.LoadedRecords]:
    total = good + len(bad_lines)
    lines = ["{broken" if i in bad_lines else SFT for i in range(1, total + 1)]
    path = write_jsonl(lines)
    return path, _load(path, "sft-rag")


def test_policy_clean_data_passes(write_jsonl):
    _, loaded = _mixed(write_jsonl, 3, [])
    enforce_policy(loaded, "fail", 0.0, "data.train")


def test_policy_no_records_at_all(write_jsonl):
    loaded = _load(write_jsonl(["", "  "]), "sft-rag")
    with pytest.raises(DataError, match=r"data\.train: the files hold no records"):
        enforce_policy(loaded, "skip", 1.0, "data.train")


def test_policy_fail_stops_on_one_bad_record_and_names_it(write_jsonl):
    path, loaded = _mixed(write_jsonl, 9, [4])
    with pytest.raises(DataError) as info:
        enforce_policy(loaded, "fail", 0.5, "data.train")
    msg = str(info.value)
    assert "data.train: 1 bad record(s) of 10" in msg
    assert f"{path}:4: invalid JSON" in msg
    assert "data.on_error=skip" in msg


def test_policy_skip_within_the_fraction(write_jsonl):
    _, loaded = _mixed(write_jsonl, 8, [2, 5])
    enforce_policy(loaded, "skip", 0.2, "data.train")  # 2 of 10 = 20%: allowed
    assert len(loaded.records) == 8 and len(loaded.bad) == 2


def test_policy_skip_over_the_fraction_names_the_bad_lines(write_jsonl):
    path, loaded = _mixed(write_jsonl, 7, [2, 5, 9])
    with pytest.raises(DataError) as info:
        enforce_policy(loaded, "skip", 0.2, "data.train")
    msg = str(info.value)
    assert "3 of 10 records are bad (30.0%)" in msg
    assert "max_bad_fraction=20.0%" in msg
    for line in (2, 5, 9):
        assert f"{path}:{line}: invalid JSON" in msg


def test_policy_lists_at_most_twenty_bad_records(write_jsonl):
    bad_lines = list(range(1, 26))
    path, loaded = _mixed(write_jsonl, 1, bad_lines)
    with pytest.raises(DataError) as info:
        enforce_policy(loaded, "fail", 0.0, "data.train")
    msg = str(info.value)
    assert f"{path}:20:" in msg
    assert f"{path}:21:" not in msg
    assert "... and 5 more" in msg


def test_bad_record_str():
    assert str(BadRecord("a/b.jsonl", 12, "missing field 'query'")) == "a/b.jsonl:12: missing field 'query'"


# ------------------------------------------------------------------------------------------- paths


def test_expand_paths_globs_in_order(tmp_path: Path):
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl", "sub/d.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n", encoding="utf-8")
    found = expand_paths([str(tmp_path / "*.jsonl"), str(tmp_path / "sub" / "c.jsonl")])
    assert found == [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "sub" / "c.jsonl"]
    recursive = expand_paths([str(tmp_path / "**" / "*.jsonl")])
    assert set(recursive) == {tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "sub" / "c.jsonl"}
    assert expand_paths([str(tmp_path / "sub" / "*")]) == [
        tmp_path / "sub" / "c.jsonl",
        tmp_path / "sub" / "d.txt",
    ]


def test_expand_paths_missing_patterns_are_all_named(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        expand_paths(
            [str(tmp_path / "a.jsonl"), str(tmp_path / "nope*.jsonl"), "missing.jsonl"], what="data.eval"
        )
    msg = str(info.value)
    assert msg.startswith("data.eval: no file matches")
    assert repr(str(tmp_path / "nope*.jsonl")) in msg
    assert "'missing.jsonl'" in msg
    assert repr(str(tmp_path / "a.jsonl")) not in msg


def test_expand_paths_directory_is_not_a_file(tmp_path: Path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError):
        expand_paths([str(tmp_path / "dir.jsonl")])
