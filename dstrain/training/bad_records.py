"""Training records that fail at tokenisation (an over-long prompt): named once, then failed or skipped as
data.on_error says, and counted once each toward data.max_bad_fraction, across epochs, ranks and resumes.

Such a record fails every time it is drawn, once per epoch, and not always on the same rank. So the run
keeps the distinct ones by corpus index: each rank notes those it met, a logged step merges them over ranks
into the trainer state's `bad_records` (saved with every checkpoint, so a resumed run neither counts them
again nor forgets them), and `skipped_reads` counts every skip. The records the index found bad never reach
a micro batch: they are counted once, at start-up (`Tally.index_bad`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dstrain.checkpoint.state import TrainerState
from dstrain.data.records import BadRecord
from dstrain.distributed.collectives import all_gather_bytes
from dstrain.errors import DataError
from dstrain.training.session import Run, Tally


def note_bad_records(run: Run, tally: Tally, bad: list[BadRecord]) -> None:
    """Records that could not be tokenised: named by the rank that read them (once each), then failed or
    noted for the next logged step's count."""
    if run.data.on_error == "fail":
        tally.failed_records += bad
        return
    tally.failed_records += [record for record in bad if record.fatal]
    for record in (record for record in bad if not record.fatal):
        if record.index in tally.met_bad or record.index in tally.known_bad:
            continue  # named when first met (by this rank, or by any before the last log or the resume)
        tally.met_bad.add(record.index)
        message = f"warning: {record} (skipped: data.on_error=skip)"
        if run.rank == 0:
            run.sink.print(f"[yellow]{message}[/]")
        else:
            print(f"[rank {run.rank}] {message}", file=sys.stderr)


def count_skipped(tally: Tally, state: TrainerState, skipped_reads: int) -> None:
    """At a logged step, on every rank: add the skips of all ranks since the last log (`skipped_reads`, the
    meter's reduced count) and merge the records met into the distinct set every rank and checkpoint share."""
    state.skipped_reads += skipped_reads
    if not skipped_reads:  # the same reduced count on every rank: all gather below, or none
        return
    new = np.array(sorted(tally.met_bad - tally.known_bad), dtype=np.int64)
    for blob in all_gather_bytes(new.tobytes()):  # a few bytes per bad record, only on steps that met one
        tally.known_bad.update(int(index) for index in np.frombuffer(blob, dtype=np.int64))
    state.bad_records = sorted(tally.known_bad)


def fail_on_bad_records(tally: Tally, output_dir: Path, step: int) -> None:
    """Every rank raises together (the step's flags said some rank met a bad record under on_error=fail)."""
    mine = "\n".join(f"  {record}" for record in tally.failed_records)
    found = f"\n{mine}" if mine else " on another rank (its message names the record)"
    raise DataError(
        f"data.train: step {step} met record(s) it cannot train on{found}\n"
        "Fix or remove them (or raise data.max_seq_len for over-long prompts), or continue past over-long "
        f"prompts with `dstrain resume {output_dir} --set data.on_error=skip --set "
        "data.max_bad_fraction=0.01`; the last checkpoint is intact."
    )


def check_bad_fraction(tally: Tally, limit: float) -> None:
    """Distinct bad records over distinct records of data.train: a record skipped in every epoch is one."""
    fraction = tally.skipped_records / max(1, tally.records_seen)
    if fraction > limit:
        raise DataError(
            f"data.train: {tally.skipped_records} of {tally.records_seen} records were skipped as bad "
            f"({fraction:.1%}), over data.max_bad_fraction={limit:.1%}; the warnings name each once "
            "(logs/rank-*.log in the run dir keep those of earlier attempts). "
            "Fix the data, or raise data.max_bad_fraction and `dstrain resume` the run."
        )
