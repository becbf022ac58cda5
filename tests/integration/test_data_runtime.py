"""Records that only fail at tokenisation (a prompt over max_seq_len) during a real run: data.on_error decides,
every such record is named by file and line, and skipped records are counted in metrics."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import assert_clean_failure, check, dstrain, metrics, write_config

LONG = {"query": "why " * 300, "retrieval_result": ["p"], "answer": "a"}


def with_long_records(train: Path, lines: tuple[int, ...]) -> None:
    rows = train.read_text(encoding="utf-8").splitlines()
    for line in lines:
        rows[line - 1] = json.dumps(LONG)
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_fail_policy_stops_with_the_record_named(tmp_path, small_data):
    with_long_records(small_data["train"], (5,))
    # one epoch of 64 records (8 steps of 8) reaches line 5 whatever the shuffle
    config = write_config(tmp_path, small_data, train={"max_steps": 8, "save_every": 0})
    proc = dstrain("train", "--config", str(config), cwd=tmp_path)
    assert_clean_failure(
        proc, f"{small_data['train']}:5: over-long record: the prompt alone is", "--set data.on_error=skip"
    )


def test_skip_policy_counts_each_skipped_record_once(tmp_path, small_data):
    with_long_records(small_data["train"], (5, 40))
    config = write_config(
        tmp_path,
        small_data,
        data={"on_error": "skip", "max_bad_fraction": 0.05},
        train={"max_steps": 8, "save_every": 0, "log_every": 1},
    )
    proc = check(dstrain("train", "--config", str(config), cwd=tmp_path))
    out = proc.stdout + proc.stderr
    for line in (5, 40):
        assert f"{small_data['train']}:{line}: over-long record" in out
    rows = [row for row in metrics(tmp_path / "run") if "loss" in row]
    assert rows[-1]["skipped_records"] == 2
    assert sum(row["tokens"] > 0 for row in rows) == 8
    assert rows[-1]["samples"] == 64  # the data position counts records read, good or bad


def test_skip_policy_still_enforces_max_bad_fraction(tmp_path, small_data):
    with_long_records(small_data["train"], (5, 40))
    config = write_config(
        tmp_path,
        small_data,
        data={"on_error": "skip", "max_bad_fraction": 0.02},  # 2 of 64 = 3.1%
        train={"max_steps": 8, "save_every": 0, "log_every": 1},
    )
    proc = dstrain("train", "--config", str(config), cwd=tmp_path)
    assert_clean_failure(proc, "2 of 64 records were skipped as bad (3.1%)", "data.max_bad_fraction=2.0%")
