"""Whole files read into memory, for tests that compare against the streamed index (training never does)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dstrain.data.records import BadRecord, Record, check_bad, read_file


@dataclass
class LoadedRecords:
    records: list[Record] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (path, line) of each record
    bad: list[BadRecord] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return len(self.records) + len(self.bad)


def load_records(paths: list[Path], fmt: str) -> LoadedRecords:
    loaded = LoadedRecords()
    for path in paths:
        for number, item in read_file(path, fmt):
            if isinstance(item, BadRecord):
                loaded.bad.append(item)
            else:
                loaded.records.append(item)
                loaded.origins.append((str(path), number))
    return loaded


def enforce_policy(loaded: LoadedRecords, on_error: str, max_bad_fraction: float, what: str) -> None:
    """data.on_error over a loaded file, through the check training applies to its index."""
    check_bad(len(loaded.records), loaded.bad, len(loaded.bad), on_error, max_bad_fraction, what)
