"""Read and validate the record formats; every bad record becomes `path:line: reason`.

Formats (SPEC section 2): preference {query, retrieval_result, chosen, rejected}, sft-rag {query,
retrieval_result, answer}, messages {messages: [{role, content}]}, kto {query, retrieval_result, answer,
label: true|false} (unpaired feedback: the answer is desirable or not). UTF-8 with or without BOM, LF or CRLF,
blank lines ignored, extra fields ignored; JSON Lines or one top-level JSON array (`json_array`). Every
string field is cleaned as it is parsed (`clean_text`, data.clean), so all readers see the same text.
"""

from __future__ import annotations

import glob
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstrain.errors import DataError

MAX_RECORD_BYTES = 4 * 1024 * 1024  # a single line above this is almost surely a broken file, not a record
ROLES = ("system", "user", "assistant")
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class RagRecord:
    """sft-rag, preference and kto records. `answer` is the SFT target (the chosen answer for preference
    data); `desirable` is a kto record's label (None for the other formats)."""

    query: str
    passages: tuple[str, ...]
    answer: str
    rejected: str | None = None
    desirable: bool | None = None


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
    index: int = -1  # its number in the training corpus, when met at tokenisation (-1: found by the index)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


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


# ------------------------------------------------------------------------------------------- cleaning

# C0 and C1 control characters except tab and newline. Carriage returns are turned into newlines first.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """Unicode NFC, control characters other than newline and tab removed, trailing white space stripped.

    Applied to every string field where records are parsed (`data.clean`, on by default), so training,
    evaluation, generation and `dstrain convert` all see the same text.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.rstrip()


class _Tidy:
    """Cleans field values when asked, and remembers whether it changed any."""

    def __init__(self, clean: bool) -> None:
        self.clean, self.changed = clean, False

    def __call__(self, value: str) -> str:
        if not self.clean:
            return value
        out = clean_text(value)
        self.changed = self.changed or out != value
        return out


def _text(obj: dict[str, Any], key: str, tidy: _Tidy) -> str:
    if key not in obj:
        raise ValueError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    value = tidy(value)
    if not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return value


def _answer(obj: dict[str, Any], key: str, tidy: _Tidy) -> str:
    value = obj.get(key)
    if isinstance(value, dict):
        try:
            return _text(value, "text", tidy)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    if key in obj and not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string or {{\"text\": str}}, got {type(value).__name__}")
    return _text(obj, key, tidy)


def _passages(obj: dict[str, Any], tidy: _Tidy) -> tuple[str, ...]:
    if "retrieval_result" not in obj:
        raise ValueError("missing field 'retrieval_result'")
    value = obj["retrieval_result"]
    if not isinstance(value, list):
        raise ValueError(f"field 'retrieval_result' must be a list of strings, got {type(value).__name__}")
    for i, passage in enumerate(value):
        if not isinstance(passage, str):
            raise ValueError(f"retrieval_result[{i}] must be a string, got {type(passage).__name__}")
    return tuple(p for p in map(tidy, value) if p.strip())


def _messages(obj: dict[str, Any], tidy: _Tidy) -> tuple[tuple[str, str], ...]:
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
        content = tidy(content)
        if not content.strip() and role == "assistant":
            raise ValueError(f"messages[{i}].content is empty")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("no assistant turn to train on")
    return tuple(turns)


def _label(obj: dict[str, Any]) -> bool:
    """A kto record's label: JSON true (desirable) or false (undesirable), nothing that only looks like one."""
    if "label" not in obj:
        raise ValueError("missing field 'label' (true for a desirable answer, false for an undesirable one)")
    value = obj["label"]
    if not isinstance(value, bool):
        raise ValueError(f"field 'label' must be true or false, got {type(value).__name__} {value!r}")
    return value


def same_text(a: str, b: str) -> bool:
    """Equal after white space is normalised (runs of it count as one space, none at either end)."""
    return a.split() == b.split()


def parse_counted(obj: Any, fmt: str, clean: bool = True) -> tuple[Record, bool]:
    """Validate one decoded JSON value against `fmt`: (the record, whether cleaning changed it).

    Raise ValueError(reason) if it does not fit. A preference pair whose answers are the same text is no
    training signal (DPO's gradient is zero on it), so it is a bad record too.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    tidy = _Tidy(clean)
    if fmt == "messages":
        return MessagesRecord(_messages(obj, tidy)), tidy.changed
    query, passages = _text(obj, "query", tidy), _passages(obj, tidy)
    if fmt == "sft-rag":
        return RagRecord(query, passages, _text(obj, "answer", tidy)), tidy.changed
    if fmt == "preference":
        chosen, rejected = _answer(obj, "chosen", tidy), _answer(obj, "rejected", tidy)
        if same_text(chosen, rejected):
            raise ValueError("chosen equals rejected")
        return RagRecord(query, passages, chosen, rejected), tidy.changed
    if fmt == "kto":
        answer = _text(obj, "answer", tidy)
        return RagRecord(query, passages, answer, desirable=_label(obj)), tidy.changed
    raise ValueError(f"unknown format {fmt!r}")


def parse_record(obj: Any, fmt: str, clean: bool = True) -> Record:
    """Validate one decoded JSON value against `fmt`; raise ValueError(reason) if it does not fit."""
    return parse_counted(obj, fmt, clean)[0]


def decode_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None


def parse_text(text: str, fmt: str, clean: bool = True) -> Record:
    """Decode one JSON line and validate it against `fmt`; raise ValueError(reason) if it does not fit."""
    return parse_record(decode_json(text), fmt, clean)


def record_to_json(record: Record) -> dict[str, Any]:
    """The record in dstrain's own format (what `dstrain convert` writes)."""
    if isinstance(record, MessagesRecord):
        return {"messages": [{"role": role, "content": content} for role, content in record.messages]}
    out: dict[str, Any] = {"query": record.query, "retrieval_result": list(record.passages)}
    if record.desirable is not None:
        out |= {"answer": record.answer, "label": record.desirable}
    elif record.rejected is None:
        out["answer"] = record.answer
    else:
        out["chosen"], out["rejected"] = {"text": record.answer}, {"text": record.rejected}
    return out


def read_file(path: Path, fmt: str, clean: bool = True) -> Iterator[tuple[int, Record | BadRecord]]:
    """(line number, record or the reason it is bad) for each record of `path` (JSONL or a JSON array)."""
    from dstrain.data import json_array

    if json_array.sniff(path) == "array":
        for element in json_array.iter_elements(path, MAX_RECORD_BYTES):
            try:
                if element.error is not None:
                    raise ValueError(element.error)
                yield element.line, parse_record(element.value, fmt, clean)
            except ValueError as exc:
                reason = str(exc) if element.error else f"element {element.number}: {exc}"
                yield element.line, BadRecord(str(path), element.line, reason)
        return
    for number, text, error in iter_lines(path):
        try:
            if error is not None:
                raise ValueError(error)
            yield number, parse_text(text, fmt, clean)
        except ValueError as exc:
            yield number, BadRecord(str(path), number, str(exc))


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
