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


def test_skip_policy_counts_each_bad_record_once_across_epochs_and_a_resume(tmp_path, small_data):
    # 4 of 64 records (6.3%) under a 10% limit, drawn again in each of 3 epochs: 12 skips, still 4 records
    lines = (5, 20, 40, 60)
    with_long_records(small_data["train"], lines)
    config = write_config(
        tmp_path,
        small_data,
        data={"on_error": "skip", "max_bad_fraction": 0.1, "group_by_length": False, "eval": []},
        train={"max_steps": 0, "epochs": 3, "save_every": 4, "keep_last": 10, "log_every": 1},
    )
    proc = check(dstrain("train", "--config", str(config), cwd=tmp_path))
    out = proc.stdout + proc.stderr
    for line in lines:  # named once, not once per epoch
        assert out.count(f"{small_data['train']}:{line}: over-long record") == 1
    run = tmp_path / "run"
    rows = {row["step"]: row for row in metrics(run) if "loss" in row}
    assert (rows[24]["skipped_records"], rows[24]["skipped_reads"]) == (4, 12)
    assert rows[24]["samples"] == 3 * 64  # the data position counts records read, good or bad
    # Resumed mid-epoch 0 (some bad records met, some not yet): it neither forgets nor recounts them.
    assert 0 < rows[4]["skipped_records"] < 4, "the test needs a checkpoint between two bad records"
    proc = check(dstrain("resume", str(run / "checkpoints" / "step-00000004"), cwd=tmp_path))
    # it names only the bad records its checkpoint did not know yet
    assert (proc.stdout + proc.stderr).count(": over-long record") == 4 - rows[4]["skipped_records"]
    resumed = {row["step"]: row for row in metrics(run) if "loss" in row}
    for step in range(5, 25):
        counts = [(r[step]["skipped_records"], r[step]["skipped_reads"]) for r in (rows, resumed)]
        assert counts[0] == counts[1], f"step {step}: uninterrupted, resumed (skipped_records, _reads)"


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
