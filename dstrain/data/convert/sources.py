"""Upstream files as a stream of decoded JSON values, each with its line: JSON Lines or a JSON array.

Constant memory for JSON Lines (one line of at most MAX_RECORD_BYTES at a time, longer ones measured and
skipped), bounded memory for arrays (`json_array`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstrain.data import json_array, records
from dstrain.data.index import read_bounded_line
from dstrain.data.records import decode_line, over_long_bytes


@dataclass(frozen=True)
class Item:
    line: int
    value: Any = None
    error: str | None = None  # why the value could not be read (invalid JSON, not UTF-8, ...)
    element: int | None = None  # its position in a JSON array (None in JSON Lines)


def iter_items(path: Path) -> Iterator[Item]:
    """Every record of `path` (blank lines skipped); a file that is neither JSONL nor an array is a DataError."""
    limit = records.MAX_RECORD_BYTES
    if json_array.sniff(path) == "array":
        for element in json_array.iter_elements(path, limit):
            yield Item(element.line, element.value, element.error, element.number)
        return
    with path.open("rb") as fh:
        for number in itertools.count(1):
            raw, size = read_bounded_line(fh, limit + 2)
            if not size:
                return
            if size != len(raw):
                yield Item(number, error=over_long_bytes(size, limit))
                continue
            text, error = decode_line(raw, first=number == 1, limit=limit)
            if error is not None:
                yield Item(number, error=error)
            elif text:
                yield _decoded(number, text)


def _decoded(number: int, text: str) -> Item:
    try:
        return Item(number, json.loads(text))
    except json.JSONDecodeError as exc:
        return Item(number, error=f"invalid JSON ({exc.msg} at column {exc.colno})")


def sample(path: Path, size: int = 20) -> list[Any]:
    """The first `size` readable values of `path`: what `--from auto` decides by."""
    values = (item.value for item in iter_items(path) if item.error is None)
    return list(itertools.islice(values, size))
