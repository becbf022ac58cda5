"""KTO data: the `kto` record format (validated like the others), KTO examples from kto and preference files
(each paired with the answer of the record half the data away), their batches, and DDR -> kto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain.config.run import DataConfig, ModelConfig
from dstrain.data.convert import Options, convert_files
from dstrain.data.index import index_file
from dstrain.data.kto import KtoExample, partner
from dstrain.data.loader import TokenizedCorpus, collate_micro
from dstrain.data.records import BadRecord, parse_record, record_to_json
from dstrain.data.stream import Corpus
from dstrain.errors import DataError
from dstrain.model.build import load_tokenizer
from dstrain.objectives.normalize import host_units
from tests.helpers import dstrain

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "upstream"
CFG = DataConfig(max_seq_len=64, max_passage_tokens=32)


def kto_row(i: int, label: bool = True) -> dict:
    return {
        "query": f"question {i}?",
        "retrieval_result": [f"passage {i}"],
        "answer": f"answer {i}",
        "label": label,
    }


def write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def test_kto_records_parse_round_trip_and_are_validated(tmp_path):
    record = parse_record(kto_row(1, False), "kto")
    assert (record.answer, record.desirable, record.rejected) == ("answer 1", False, None)
    assert record_to_json(record) == kto_row(1, False)
    rows = [
        kto_row(0),
        {**kto_row(1), "label": 1},  # JSON 1 is not a label
        {k: v for k, v in kto_row(2).items() if k != "label"},
        {**kto_row(3), "answer": " "},
        {**kto_row(4), "label": "false"},
        kto_row(5, False),
    ]
    path = write(tmp_path / "kto.jsonl", rows)
    proc = dstrain("validate-data", str(path), "--format", "kto", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{path}:2: field 'label' must be true or false, got int 1",
        f"{path}:3: missing field 'label' (true for a desirable answer, false for an undesirable one)",
        f"{path}:4: field 'answer' is empty",
        f"{path}:5: field 'label' must be true or false, got str 'false'",
        f"{path}: 6 records, 2 ok, 4 bad",
    ]


def test_partner_is_half_the_records_away_and_never_itself():
    for records in (2, 3, 7, 10):
        partners = [partner(r, records) for r in range(records)]
        assert all(p != r for r, p in enumerate(partners))
        assert sorted(partners) == list(range(records))  # every answer serves as a mismatched one once
    assert [partner(r, 10) for r in range(3)] == [5, 6, 7]


def test_examples_from_kto_and_preference_files(tmp_path, tokenizer):
    """A kto file gives one example per record, a preference file two (chosen desirable, rejected not); each
    example's second answer row is the partner record's answer (same side) after its own prompt."""
    kto = write(tmp_path / "k.jsonl", [kto_row(i, i % 2 == 0) for i in range(4)])
    data = TokenizedCorpus(Corpus([index_file(kto, "kto", use_cache=False)]), tokenizer, CFG, True, kto=1)
    assert len(data) == 4 and list(data.sizes()) == list(index_file(kto, "kto", use_cache=False).lengths)
    example = data[1]
    assert isinstance(example, KtoExample) and not example.desirable and not example.paired
    assert tokenizer.decode(example.answer_ids, skip_special_tokens=True).strip() == "answer 1"
    assert tokenizer.decode(example.kl_ids, skip_special_tokens=True).strip() == "answer 3"

    rows = [{**kto_row(i), "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    pref = write(tmp_path / "p.jsonl", rows)
    pairs = TokenizedCorpus(
        Corpus([index_file(pref, "preference", use_cache=False)]), tokenizer, CFG, True, kto=2
    )
    assert len(pairs) == 6 and len(pairs.sizes()) == 6
    chosen, rejected = pairs[2], pairs[3]  # record 1's two sides; its partner is record 2
    assert (chosen.desirable, rejected.desirable, chosen.paired) == (True, False, True)
    assert chosen.prompt_ids == rejected.prompt_ids
    decode = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in
              (chosen.answer_ids, chosen.kl_ids, rejected.answer_ids, rejected.kl_ids)]  # fmt: skip
    assert decode == ["good 1", "good 2", "bad 1", "bad 2"]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_kto_batches_count_examples_and_carry_labels(tmp_path, tokenizer, share_prompt):
    path = write(tmp_path / "k.jsonl", [kto_row(i, i != 1) for i in range(3)])
    data = TokenizedCorpus(Corpus([index_file(path, "kto", use_cache=False)]), tokenizer, CFG, True, kto=1)
    bad = BadRecord("x", 1, "over-long record")
    batch = collate_micro(
        [data[0], bad, data[1], data[2]], 0, pairs=True, share_prompt=share_prompt, kto=True
    )
    assert batch.desirable.tolist() == [True, False, True] and batch.indices == [0, 1, 2]
    answer_tokens = sum(len(data[i].answer_ids) for i in range(3))
    assert host_units(batch.inputs, pairs=True) == (answer_tokens, 3)  # real examples, as pairs count
    filler = collate_micro([bad], 0, pairs=True, share_prompt=share_prompt, kto=True)
    assert filler.desirable.tolist() == [False] and host_units(filler.inputs, pairs=True) == (0, 0)
    assert filler.inputs["input_ids"].shape[0] == (1 if share_prompt else 2)


def test_ddr_scored_output_to_kto(tmp_path):
    """Every scored context entry becomes one record: desirable at or above --threshold (0.5 by default)."""
    out = tmp_path / "ddr.kto.jsonl"
    said: list[str] = []
    summary = convert_files([FIXTURES / "ddr_scored.jsonl"], "ddr", "kto", out, Options(), report=said.append)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert (summary.read, summary.written, summary.num_dropped) == (17, 42, 3)  # 14 samples x 3 answers
    index = index_file(out, "kto")
    assert (len(index), index.num_bad) == (42, 0)
    assert [(r["answer"], r["label"]) for r in rows[:3]] == [
        ("the Yellow River", True),  # rouge 0.9
        ("I think the Yellow River.", True),  # 0.55
        ("the Yangtze", False),  # 0.1
    ]
    assert rows[0]["query"] == "Which river does the Wei flow into?" and len(rows[0]["retrieval_result"]) == 2
    assert sum(r["label"] for r in rows) == 28
    strict = convert_files([FIXTURES / "ddr_scored.jsonl"], "ddr", "kto", out, Options(threshold=0.6))
    assert strict.written == 42 and sum(json.loads(x)["label"] for x in out.read_text().splitlines()) == 14
    none = convert_files([FIXTURES / "ddr_scored.jsonl"], "ddr", "kto", out, Options(pick_by="f1_score"))
    assert none.written == 0 and none.dropped["no context entry with text and a numeric 'f1_score'"] == 14


def test_ddr_to_kto_from_the_cli(tmp_path):
    out = tmp_path / "k.jsonl"
    src = str(FIXTURES / "ddr_scored.jsonl")
    proc = dstrain("convert", src, "--to", "kto", "--threshold", "0.95", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0 and "--from auto picked ddr" in proc.stdout and "42 written" in proc.stdout
    assert not any(json.loads(line)["label"] for line in out.read_text(encoding="utf-8").splitlines())
    with pytest.raises(DataError, match="--threshold labels DDR answers for --to kto; it does nothing"):
        convert_files([FIXTURES / "ddr_scored.jsonl"], "ddr", "preference", out, Options(threshold=0.5))
