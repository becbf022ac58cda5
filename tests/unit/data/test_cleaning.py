"""data.clean: NFC, control characters out, trailing white space off, counted; degenerate preference pairs."""

from __future__ import annotations

import pytest

from dstrain.config.run import DataConfig
from dstrain.data.index import index_file
from dstrain.data.records import clean_text, parse_counted, parse_record
from dstrain.data.stream import Corpus

PREF = {"query": "q?", "retrieval_result": ["p1"], "chosen": {"text": "good"}, "rejected": {"text": "bad"}}


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Cafe\u0301", "Caf\u00e9"),  # NFD -> NFC
        ("a\u0000b\u0007c\u007f\u0085d", "abcd"),  # C0, DEL and C1 controls
        ("line 1\r\nline 2\rline 3", "line 1\nline 2\nline 3"),  # carriage returns become newlines
        ("keep\ttabs\nand newlines  \t\n ", "keep\ttabs\nand newlines"),  # trailing white space only
        ("  leading stays", "  leading stays"),
        ("渭河 ✓ 😀", "渭河 ✓ 😀"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_cleaning_is_counted_and_can_be_turned_off():
    obj = {"query": "q\u0007?", "retrieval_result": ["p "], "answer": "a"}
    record, changed = parse_counted(obj, "sft-rag")
    assert (record.query, record.passages, changed) == ("q?", ("p",), True)
    raw, changed = parse_counted(obj, "sft-rag", clean=False)
    assert (raw.query, changed) == ("q\u0007?", False)
    assert parse_counted({**obj, "query": "q?", "retrieval_result": ["p"]}, "sft-rag")[1] is False


def test_text_that_cleaning_empties_is_empty():
    with pytest.raises(ValueError, match="field 'answer' is empty"):
        parse_record({"query": "q", "retrieval_result": [], "answer": "\u0000\u0001 "}, "sft-rag")


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [("same", "same"), ("the  answer\n", " the answer"), ({"text": "x y"}, "x\ty"), ("a\u0007", "a")],
)
def test_chosen_equal_to_rejected_is_a_bad_record(chosen, rejected):
    with pytest.raises(ValueError, match=r"^chosen equals rejected$"):
        parse_record(dict(PREF, chosen=chosen, rejected=rejected), "preference")


def test_empty_answer_after_cleaning_is_a_bad_pair():
    with pytest.raises(ValueError, match="rejected: field 'text' is empty"):
        parse_record(dict(PREF, rejected={"text": "\u0000"}), "preference")


def test_index_counts_cleaned_records_and_keys_the_cache_by_clean(write_jsonl):
    path = write_jsonl(
        [dict(PREF, query="q? "), PREF, dict(PREF, chosen="bad"), dict(PREF, query="Cafe\u0301")]
    )
    index = index_file(path, "preference")
    assert (len(index), index.num_bad, index.num_cleaned) == (3, 1, 2)
    assert index_file(path, "preference").num_cleaned == 2  # from the cache
    assert str(index.bad[0]).endswith(":3: chosen equals rejected")
    corpus = Corpus([index])
    assert corpus.num_cleaned == 2 and corpus.read(2).query == "Caf\u00e9"
    raw = Corpus([index_file(path, "preference", clean=False)])
    assert raw.num_cleaned == 0 and raw.read(2).query == "Cafe\u0301"


def test_data_config_cleans_by_default():
    assert DataConfig().clean is True
