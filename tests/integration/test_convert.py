"""`dstrain convert` as users run it, and training on what it wrote (3 steps per format, the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import check, dstrain, metrics, train_single, write_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
# per dstrain format: the fixtures converted into it (--from auto), and the objective that trains on it
RUNS = {
    "preference": (["ddr_scored.jsonl"], {"name": "dpo"}),
    "sft-rag": (
        ["ddr_first_stage.jsonl", "kbalign_sft_pairs.jsonl", "rageval.jsonl", "raft.jsonl"],
        {"name": "sft"},
    ),
    "messages": (["kbalign_sft.json", "sharegpt.json", "alpaca.json"], {"name": "sft"}),
}


def test_cli_reports_drops_and_exit_codes(tmp_path):
    out = tmp_path / "pref.jsonl"
    proc = dstrain(
        "convert", str(FIXTURES / "ddr_scored.jsonl"), "--to", "preference", "--out", str(out), cwd=tmp_path
    )
    check(proc)
    assert f"{FIXTURES / 'ddr_scored.jsonl'}:12: tie: chosen equals rejected" in proc.stdout
    assert "17 read, 10 written, 7 dropped" in proc.stdout and "--from auto picked ddr" in proc.stdout
    strict = dstrain(
        "convert",
        str(FIXTURES / "ddr_scored.jsonl"),
        "--from",
        "ddr",
        "--to",
        "preference",
        "--out",
        str(out),
        "--strict",
        cwd=tmp_path,
    )
    assert strict.returncode == 1 and out.exists()
    none = dstrain(
        "convert",
        str(out),
        "--from",
        "raft",
        "--to",
        "sft-rag",
        "--out",
        str(tmp_path / "x.jsonl"),
        cwd=tmp_path,
    )
    assert none.returncode == 1 and "0 written" in none.stdout and "missing field 'cot_answer'" in none.stdout
    assert not (tmp_path / "x.jsonl").exists()
    bad = dstrain(
        "convert",
        str(out),
        "--from",
        "raft",
        "--to",
        "messages",
        "--out",
        str(tmp_path / "y.jsonl"),
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and "error: --from raft cannot produce --to messages" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_validate_data_reads_json_arrays_and_reports_cleaning(tmp_path):
    array = tmp_path / "records.json"
    rows = [{"query": f"q{i}\u0007", "retrieval_result": ["p"], "answer": "a"} for i in range(3)]
    array.write_text(json.dumps([*rows, {"query": "q"}], indent=2), encoding="utf-8")
    proc = dstrain("validate-data", str(array), "--format", "sft-rag", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{array}:23: element 3: missing field 'retrieval_result'",
        f"{array}: 4 records, 3 ok, 1 bad, 3 changed by cleaning (data.clean)",
    ]
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"data": rows}, indent=2), encoding="utf-8")
    proc = dstrain("validate-data", str(nested), "--format", "sft-rag", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("error:") == 1 and "jq -c '.data[]'" in proc.stderr


@pytest.mark.parametrize("fmt", list(RUNS))
def test_converted_files_validate_and_train(tmp_path, fmt):
    names, objective = RUNS[fmt]
    files = []
    for name in names:
        out = tmp_path / f"{Path(name).stem}.jsonl"
        check(dstrain("convert", str(FIXTURES / name), "--to", fmt, "--out", str(out), cwd=tmp_path))
        check(dstrain("validate-data", str(out), "--format", fmt, cwd=tmp_path))
        files.append(out)
    if fmt == "sft-rag":  # and a JSON array straight into training
        array = tmp_path / "array.json"
        rows = [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()]
        array.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
        files.append(array)
    config = write_config(
        tmp_path,
        {"train": files[0], "eval": files[0]},
        data={"train": [str(f) for f in files], "eval": [], "format": fmt},
        objective=objective,
        train={"max_steps": 3, "global_batch_size": 4, "save_every": 3, "eval_every": 0},
    )
    check(train_single(config, cwd=tmp_path))
    assert [r["step"] for r in metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]
