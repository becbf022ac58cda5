"""Read and validate the three record formats; every bad record becomes `path:line: reason`.

Formats (SPEC section 2): preference {query, retrieval_result, chosen, rejected}, sft-rag {query,
retrieval_result, answer}, messages {messages: [{role, content}]}. UTF-8 with or without BOM, LF or CRLF,
blank lines ignored, extra fields ignored.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dstrain.errors import DataError

MAX_RECORD_BYTES = 4 * 1024 * 1024  # a single line above this is almost surely a broken file, not a record
ROLES = ("system", "user", "assistant")
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class RagRecord:
    """sft-rag and preference records. `answer` is the SFT target (the chosen answer for preference data)."""

    query: str
    passages: tuple[str, ...]
    answer: str
    rejected: str | None = None


@dataclass(frozen=True)
class MessagesRecord:
    messages: tuple[tuple[str, str], ...]  # (role, content)


Record = RagRecord | MessagesRecord


@dataclass(frozen=True)
class BadRecord:
    path: str
    line: int
    reason: str
    fatal: bool = False  # not the record's fault but the run's (its file changed): never skipped

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class LoadedRecords:
    records: list[Record] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (path, line) of each record
    bad: list[BadRecord] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return len(self.records) + len(self.bad)


def expand_paths(patterns: list[str], what: str = "data.train") -> list[Path]:
    """Expand paths and globs in order; a pattern that matches nothing is an error naming it."""
    paths: list[Path] = []
    missing = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))  # noqa: PTH207 - absolute globs
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            missing.append(pattern)
        paths.extend(files)
    if missing:
        raise DataError(f"{what}: no file matches {', '.join(repr(m) for m in missing)} (cwd {Path.cwd()})")
    return paths


def decode_line(raw: bytes, first: bool, limit: int | None = None) -> tuple[str | None, str | None]:
    """(text without line ending, None) or (None, reason) for one raw line; text "" means blank."""
    limit = MAX_RECORD_BYTES if limit is None else limit
    if first and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    if len(raw) > limit:
        return None, over_long_bytes(len(raw), limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"undecodable bytes (not UTF-8) at byte {exc.start}"
    text = text.rstrip("\r\n")
    return (text if text.strip() else ""), None


def over_long_bytes(size: int, limit: int) -> str:
    return f"record is {size} bytes, over the {limit}-byte limit"


def iter_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line number, text, error) for each non-blank line; bytes are decoded per line."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            text, error = decode_line(raw, first=number == 1)
            if error is not None or text:
                yield number, text, error


def _text(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise ValueError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return value


def _answer(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if isinstance(value, dict):
        try:
            return _text(value, "text")
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    if key in obj and not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string or {{\"text\": str}}, got {type(value).__name__}")
    return _text(obj, key)


def _passages(obj: dict[str, Any]) -> tuple[str, ...]:
    if "retrieval_result" not in obj:
        raise ValueError("missing field 'retrieval_result'")
    value = obj["retrieval_result"]
    if not isinstance(value, list):
        raise ValueError(f"field 'retrieval_result' must be a list of strings, got {type(value).__name__}")
    for i, passage in enumerate(value):
        if not isinstance(passage, str):
            raise ValueError(f"retrieval_result[{i}] must be a string, got {type(passage).__name__}")
    return tuple(p for p in value if p.strip())


def _messages(obj: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    value = obj.get("messages")
    if not isinstance(value, list) or not value:
        raise ValueError("field 'messages' must be a non-empty list of {role, content}")
    turns = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if not content.strip() and role == "assistant":
            raise ValueError(f"messages[{i}].content is empty")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("no assistant turn to train on")
    return tuple(turns)


def parse_record(obj: Any, fmt: str) -> Record:
    """Validate one decoded JSON value against `fmt`; raise ValueError(reason) if it does not fit."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "messages":
        return MessagesRecord(_messages(obj))
    query, passages = _text(obj, "query"), _passages(obj)
    if fmt == "sft-rag":
        return RagRecord(query, passages, _text(obj, "answer"))
    if fmt == "preference":
        return RagRecord(query, passages, _answer(obj, "chosen"), _answer(obj, "rejected"))
    raise ValueError(f"unknown format {fmt!r}")


def parse_text(text: str, fmt: str) -> Record:
    """Decode one JSON line and validate it against `fmt`; raise ValueError(reason) if it does not fit."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    return parse_record(obj, fmt)


def read_file(path: Path, fmt: str) -> Iterator[tuple[int, Record | BadRecord]]:
    """(line number, record or the reason it is bad) for each non-blank line of `path`."""
    for number, text, error in iter_lines(path):
        try:
            if error is not None:
                raise ValueError(error)
            yield number, parse_text(text, fmt)
        except ValueError as exc:
            yield number, BadRecord(str(path), number, str(exc))


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
    check_bad(len(loaded.records), loaded.bad, len(loaded.bad), on_error, max_bad_fraction, what)


def check_bad(
    good: int, bad: Sequence[BadRecord], num_bad: int, on_error: str, max_bad_fraction: float, what: str
) -> None:
    """fail: any bad record stops the run. skip: tolerate up to max_bad_fraction of them, reporting each.

    `bad` may hold only the first of the `num_bad` bad records: the message shows at most 20.
    """
    if not num_bad:
        if not good:
            raise DataError(f"{what}: the files hold no records")
        return
    shown = "\n".join(f"  {b}" for b in bad[:20])
    more = f"\n  ... and {num_bad - 20} more" if num_bad > 20 else ""
    seen = good + num_bad
    fraction = num_bad / seen
    if on_error == "fail":
        raise DataError(
            f"{what}: {num_bad} bad record(s) of {seen}:\n{shown}{more}\n"
            "Fix them (see `dstrain validate-data`), or set data.on_error=skip with data.max_bad_fraction."
        )
    if fraction > max_bad_fraction:
        raise DataError(
            f"{what}: {num_bad} of {seen} records are bad ({fraction:.1%}), over "
            f"data.max_bad_fraction={max_bad_fraction:.1%}:\n{shown}{more}"
        )
