"""`dstrain convert` per upstream family, on hand-written fixtures in the upstream shapes (messy records too).

Every written file must pass the same validation training applies (`index_file`, what validate-data runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain.data.convert import CONVERTERS, Drop, Options, convert_files, register, registry
from dstrain.data.convert.kbalign import split_prompt, strip_wrapper
from dstrain.data.convert.pipeline import reason_key
from dstrain.data.index import index_file
from dstrain.errors import DataError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "upstream"


def convert(tmp_path: Path, name: str, family: str, to: str, **opts) -> tuple[list[dict], list[str], object]:
    out = tmp_path / f"{Path(name).stem}.{to}.jsonl"
    out.unlink(missing_ok=True)
    said: list[str] = []
    summary = convert_files([FIXTURES / name], family, to, out, Options(**opts), report=said.append)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
    if rows:
        index = index_file(out, to)
        assert (len(index), index.num_bad, index.num_cleaned) == (len(rows), 0, 0)  # valid and already clean
    return rows, said, summary


def dropped(said: list[str]) -> dict[int, str]:
    """line -> reason of each reported drop."""
    return {int(s.split(":")[1]): s.split(": ", 1)[1] for s in said if s.count(":") >= 2 and "auto" not in s}


def test_ddr_scored_output_to_preference(tmp_path):
    rows, said, summary = convert(tmp_path, "ddr_scored.jsonl", "ddr", "preference")  # BOM, CRLF, blank line
    assert (summary.read, summary.written) == (17, 10)
    assert rows[0] == {
        "query": "Which river does the Wei flow into?",
        "retrieval_result": [
            "The Wei River is the largest tributary of the Yellow River.",
            "The people of Oskavel trade in wool.",
        ],
        "chosen": {"text": "the Yellow River"},
        "rejected": {"text": "the Yangtze"},
    }
    assert dropped(said) == {
        12: "tie: chosen equals rejected",
        13: "tie: chosen and rejected have the same rouge_score",
        14: "missing field 'query'",
        15: "missing field 'retrieval_result'",
        16: "field 'chosen' must be a context entry {\"text\", ...}, got int",
        17: "field 'chosen.text' is empty",
        18: "invalid JSON (Expecting value at column 81)",  # the truncated last line
    }
    assert summary.dropped["tie: chosen equals rejected"] == 1


def test_ddr_pick_by_and_min_margin(tmp_path):
    rows, said, _ = convert(tmp_path, "ddr_scored.jsonl", "ddr", "preference", pick_by="rouge_score")
    # re-picked from `context`: the ties and the broken chosen entries get a max/min pair there
    assert len(rows) == 14 and not [d for d in dropped(said).values() if "chosen" in d]
    rows, said, summary = convert(tmp_path, "ddr_scored.jsonl", "ddr", "preference", min_margin=0.85)
    assert rows == [] and summary.dropped["rouge_score margin below --min-margin"] == 10
    _, said, summary = convert(tmp_path, "ddr_scored.jsonl", "ddr", "preference", pick_by="f1_score")
    assert summary.dropped["fewer than N context entries scored by 'f1_score'"] == 14


def test_ddr_first_stage_to_sft_rag_with_ground_truth_as_answer(tmp_path):
    rows, said, summary = convert(tmp_path, "ddr_first_stage.jsonl", "ddr-sft", "sft-rag")
    assert rows[0]["answer"] == "the Yellow River" and len(rows) == 11
    assert rows[10] == {  # cleaned: NFC, the bell character and trailing white space are gone
        "query": "When did Caf\u00e9 Haber open?",
        "retrieval_result": ["Caf\u00e9 Haber opened in 1901."],
        "answer": "in 1901",
    }
    assert summary.cleaned == 1
    assert set(dropped(said).values()) == {
        "missing field 'ground_truth'",
        "field 'query' is empty",
        "field 'retrieval_result' must be a list of strings, got str",
        "invalid JSON (Unterminated string starting at at column 11)",
    }


@pytest.mark.parametrize("name", ["kbalign_sft.json", "kbalign_sft_data.jsonl", "kbalign_sft_pairs.jsonl"])
def test_kbalign_variants_to_messages_and_sft_rag(tmp_path, name):
    messages, said, _ = convert(tmp_path, name, "kbalign", "messages")
    assert messages[0]["messages"][0]["content"].startswith("User: You are an expert")
    stripped, _, _ = convert(tmp_path, name, "kbalign", "messages", strip_wrapper=True)
    assert stripped[0]["messages"][0]["content"].startswith("You are an expert")
    assert not stripped[0]["messages"][0]["content"].endswith("Assistant:")
    rows, said, _ = convert(tmp_path, name, "kbalign", "sft-rag")
    assert rows[0] == {
        "query": "Which river does the Wei flow into?",
        "retrieval_result": [],
        "answer": "the Yellow River",
    }
    assert rows[1]["query"] == "How high is Mount Reniar?"
    assert rows[1]["retrieval_result"] == [
        "Mount Reniar rises 5324 metres above the sea.",
        "The people of Oskavel trade in wool.",
    ]
    assert said  # each variant holds messy records


def test_kbalign_prompt_parsing():
    prompt = "User: Intro <KB0>References: \n1. first\nline two\n2. second\nNow the question is: Why?\nPlease answer this question. \nAssistant: "
    assert split_prompt(prompt) == ("Why?", ["first\nline two", "second"])
    assert strip_wrapper("User: hello \nAssistant: ") == "hello"
    assert strip_wrapper("no wrapper") == "no wrapper"


def test_rageval_passages_from_prediction_else_ground_truth(tmp_path):
    rows, said, _ = convert(tmp_path, "rageval.jsonl", "rageval", "sft-rag")
    assert rows[0]["retrieval_result"] == [
        "The Wei River is the largest tributary of the Yellow River."
    ]  # no prediction refs
    assert rows[1]["retrieval_result"][1] == "The people of Oskavel trade in wool."  # the prediction's
    assert rows[0]["answer"] == "the Yellow River"
    forced, _, _ = convert(tmp_path, "rageval.jsonl", "rageval", "sft-rag", passages_from="ground_truth")
    assert forced[1]["retrieval_result"] == ["Mount Reniar rises 5324 metres above the sea."]
    assert set(dropped(said).values()) == {
        "missing field 'ground_truth.content'",
        "ground_truth.references[0] must be a string, got int",
    }


def test_raft_answer_whole_or_after_the_marker(tmp_path):
    rows, said, _ = convert(tmp_path, "raft.jsonl", "raft", "sft-rag")
    assert rows[0]["answer"].startswith("##Reason:") and rows[0]["answer"].endswith(
        "<ANSWER>: the Yellow River"
    )
    assert rows[0]["retrieval_result"][1] == "The Wei River is the largest tributary of the Yellow River."
    final, said, _ = convert(tmp_path, "raft.jsonl", "raft", "sft-rag", final_answer=True)
    assert final[0]["answer"] == "the Yellow River"
    assert set(dropped(said).values()) == {"no '<ANSWER>:' in cot_answer", "missing field 'context'"}


def test_alpaca_array_to_messages_and_sft_rag(tmp_path):
    rows, said, _ = convert(tmp_path, "alpaca.json", "alpaca", "messages")
    assert (
        rows[1]["messages"][0]["content"]
        == "How high is Mount Reniar?\n\nMount Reniar rises 5324 metres above the sea."
    )
    assert len(rows) == 10 and len(said) == 2
    assert all(": element " in s for s in said)  # array problems name the element
    rag, _, _ = convert(tmp_path, "alpaca.json", "alpaca", "sft-rag")
    assert rag[0] == {
        "query": "Which river does the Wei flow into?",
        "retrieval_result": [],
        "answer": "the Yellow River",
    }


def test_sharegpt_truncated_array(tmp_path):
    rows, said, summary = convert(tmp_path, "sharegpt.json", "sharegpt", "messages")
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert summary.written == 10 and summary.num_dropped == 2
    assert "the file ends inside this element" in said[-1]


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("ddr_scored.jsonl", "ddr"),
        ("ddr_first_stage.jsonl", "ddr-sft"),
        ("kbalign_sft.json", "kbalign"),
        ("kbalign_sft_data.jsonl", "kbalign"),
        ("kbalign_sft_pairs.jsonl", "kbalign"),
        ("rageval.jsonl", "rageval"),
        ("raft.jsonl", "raft"),
        ("alpaca.json", "alpaca"),
        ("sharegpt.json", "sharegpt"),
    ],
)
def test_auto_detects_every_fixture(tmp_path, name, family):
    to = CONVERTERS[family].targets[0]
    _, said, summary = convert(tmp_path, name, "auto", to)
    assert summary.families == {str(FIXTURES / name): family}
    assert said[0].endswith(f"--from auto picked {family} ({CONVERTERS[family].about})")


def test_nothing_written_leaves_no_file(tmp_path):
    out = tmp_path / "out.jsonl"
    summary = convert_files(
        [FIXTURES / "raft.jsonl"],
        "raft",
        "sft-rag",
        out,
        Options(passages_from="prediction"),
        report=lambda _: None,
    )
    assert summary.written == 11 and out.exists()
    out.unlink()
    summary = convert_files(
        [FIXTURES / "ddr_scored.jsonl"],
        "ddr",
        "preference",
        out,
        Options(min_margin=5.0),
        report=lambda _: None,
    )
    assert summary.written == 0 and not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_choices_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match="--from raft cannot produce --to preference; it produces sft-rag"):
        convert_files([FIXTURES / "raft.jsonl"], "raft", "preference", out)
    with pytest.raises(DataError, match="--to must be one of"):
        convert_files([FIXTURES / "raft.jsonl"], "auto", "dpo", out)
    with pytest.raises(DataError, match="no such file"):
        convert_files([tmp_path / "missing.jsonl"], "raft", "sft-rag", out)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"foo": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="cannot tell which upstream shape"):
        convert_files([unknown], "auto", "sft-rag", out)
    assert list(tmp_path.iterdir()) == [unknown]


def test_a_failed_conversion_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    summary = convert_files(
        [FIXTURES / "raft.jsonl"], "raft", "sft-rag", out, Options(final_answer=True), report=lambda _: None
    )
    assert summary.written == 10 and out.exists()
    before = out.read_bytes()
    other = tmp_path / "other.jsonl"
    summary = convert_files(
        [FIXTURES / "raft.jsonl"], "raft", "sft-rag", other, Options(pick_by="x"), report=lambda _: None
    )
    assert summary.written == 11  # options that other families read are ignored
    other.unlink()

    def boom(*_args):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr("dstrain.data.convert.pipeline.convert_one", boom)
    with pytest.raises(RuntimeError):
        convert_files([FIXTURES / "raft.jsonl"], "raft", "sft-rag", out)
    assert out.read_bytes() == before and sorted(tmp_path.iterdir()) == [out]


def test_adding_a_family_is_one_function(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "CONVERTERS", dict(registry.CONVERTERS))

    @register("qa-pairs", targets=("sft-rag",), detect=lambda obj: {"q", "a"} <= obj.keys())
    def qa_pairs(obj: dict, to: str, opts: Options) -> dict:
        """Plain {q, a} pairs."""
        if not obj["a"]:
            raise Drop("no answer")
        return {"query": obj["q"], "retrieval_result": [], "answer": obj["a"]}

    src = tmp_path / "qa.jsonl"
    src.write_text('{"q": "1+1?", "a": "2"}\n{"q": "x?", "a": ""}\n', encoding="utf-8")
    summary = convert_files([src], "auto", "sft-rag", tmp_path / "out.jsonl", report=lambda _: None)
    assert (summary.written, dict(summary.dropped), summary.families[str(src)]) == (
        1,
        {"no answer": 1},
        "qa-pairs",
    )


def test_reason_key_masks_particulars():
    assert (
        reason_key("element 12: retrieval_result[3] must be a string, got int")
        == "retrieval_result[N] must be a string, got int"
    )
    assert reason_key("invalid JSON (Expecting value at column 81)") == "invalid JSON"


def test_a_record_of_another_shape_under_a_forced_family_is_dropped_not_a_traceback(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
        + "\n"
        + json.dumps({"instruction": "no conversations here", "output": "x"})
        + "\n"
        + json.dumps({"conversations": [{"from": ["a list"], "value": "v"}]})
        + "\n",
        encoding="utf-8",
    )
    said: list[str] = []
    summary = convert_files(
        [src], "sharegpt", "messages", tmp_path / "out.jsonl", Options(), report=said.append
    )
    assert summary.written == 1 and sum(summary.dropped.values()) == 2
    assert any(":2:" in line and "not a sharegpt record" in line for line in said), said
