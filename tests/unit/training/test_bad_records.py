"""Bad training records met at tokenisation: named once, counted once each across epochs, ranks and a
checkpoint round trip (the single-process run with a resume is in tests/integration/test_data_runtime.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np

from dstrain.checkpoint.load import read_trainer_state
from dstrain.checkpoint.state import TRAINER_STATE, TrainerState
from dstrain.config.run import DataConfig
from dstrain.data.records import BadRecord
from dstrain.training import bad_records
from dstrain.training.session import Tally


def over_long(index: int) -> BadRecord:
    return BadRecord("train.jsonl", index + 1, "over-long record", index=index)


def fake_run(printed: list[str]) -> SimpleNamespace:
    """The three parts of a Run note_bad_records reads."""
    return SimpleNamespace(
        data=DataConfig(on_error="skip"), rank=0, sink=SimpleNamespace(print=printed.append)
    )


def test_a_record_drawn_in_every_epoch_is_one_skipped_record_and_one_warning():
    printed: list[str] = []
    run, tally, state = fake_run(printed), Tally(index_bad=2, records_seen=64), TrainerState()
    for _epoch in range(3):
        bad_records.note_bad_records(run, tally, [over_long(4), over_long(9)])
        bad_records.count_skipped(tally, state, skipped_reads=2)
    assert (tally.skipped_records, state.skipped_reads, state.bad_records) == (4, 6, [4, 9])
    assert len(printed) == 2 and "train.jsonl:5: over-long record" in printed[0]
    bad_records.check_bad_fraction(tally, 4 / 64)  # 4 distinct of 64, not 2 + 6 skips


def test_records_met_on_different_ranks_merge_into_one_set_on_every_rank(monkeypatch):
    # record 4 on rank 0 in one epoch and on rank 1 in the next (the order is reshuffled per epoch)
    met = {0: {4, 9}, 1: {4, 12}}
    blobs = [np.array(sorted(indices), dtype=np.int64).tobytes() for indices in met.values()]
    monkeypatch.setattr(bad_records, "all_gather_bytes", lambda blob: blobs)  # the collective's answer
    counted = []
    for rank in (0, 1):
        tally, state = Tally(records_seen=64, met_bad=set(met[rank])), TrainerState()
        bad_records.count_skipped(tally, state, skipped_reads=4)  # the meter's count reduced over ranks
        counted.append((tally.skipped_records, state.bad_records, state.skipped_reads))
    assert counted[0] == counted[1] == (3, [4, 9, 12], 4)


def test_no_gather_on_a_logged_step_that_skipped_nothing(monkeypatch):
    monkeypatch.setattr(bad_records, "all_gather_bytes", never_gather)
    state = TrainerState(bad_records=[3], skipped_reads=5)
    bad_records.count_skipped(Tally(known_bad={3}), state, skipped_reads=0)
    assert (state.bad_records, state.skipped_reads) == ([3], 5)


def never_gather(blob: bytes) -> list[bytes]:
    raise AssertionError("count_skipped gathered although no rank skipped a record")


def test_the_checkpoint_carries_the_distinct_records_to_the_resumed_run(tmp_path):
    run, tally, state = fake_run([]), Tally(records_seen=64), TrainerState(step=4)
    bad_records.note_bad_records(run, tally, [over_long(7)])
    bad_records.count_skipped(tally, state, skipped_reads=1)
    (tmp_path / TRAINER_STATE).write_text(json.dumps(asdict(state)), encoding="utf-8")
    saved = read_trainer_state(tmp_path)
    # what training/setup.start builds on resume; the same record drawn again in the next epoch
    resumed = Tally(records_seen=64, known_bad=set(saved.bad_records))
    assert resumed.skipped_records == 1
    bad_records.note_bad_records(run, resumed, [over_long(7)])
    bad_records.count_skipped(resumed, saved, skipped_reads=1)
    assert (resumed.skipped_records, saved.skipped_reads) == (1, 2)
