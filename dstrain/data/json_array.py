"""Stream the elements of a top-level JSON array, each with its byte offset, byte length and line.

The stdlib's `json.JSONDecoder.raw_decode` decodes one element at a time from a buffer that holds the
current element and at most one more chunk, so memory stays bounded by the largest element (and over-long
elements are skipped by a small bracket scanner without being held). The offsets let the index read any
element back later with one `pread`, exactly as it reads a JSONL line.

An array is one JSON document: after a syntax error inside an element nothing later can be trusted, so
that element is reported and the rest of the file is not read.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dstrain.errors import DataError

CHUNK = 1024 * 1024
BOM = b"\xef\xbb\xbf"
SNIFF_BYTES = 64 * 1024
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_BRACKET = re.compile(r'["\[\]{}]')
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*', re.S)  # the complete part of a string's body: no lone "\"
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as surrogateescape decodes them
_NEAR_END = 8  # an error this close to the buffer's end may just be a value cut by the chunk boundary


@dataclass(frozen=True)
class Element:
    number: int  # 0-based position in the array
    line: int  # 1-based line of its first character
    offset: int  # byte offset of its first byte
    length: int  # its size in bytes
    value: Any = None
    error: str | None = None  # why it cannot be used; `value` is None then


class _Buffer:
    """Decoded text of the file from the cursor on, and the cursor's byte offset and line."""

    def __init__(self, fh: BinaryIO, start: int) -> None:
        self.fh = fh
        # surrogateescape: undecodable bytes map to one char each, so byte offsets stay exact
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.text, self.pos, self.byte, self.line, self.eof = "", 0, start, 1, False

    def more(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at the end of the file."""
        if self.eof:
            return False
        raw = self.fh.read(CHUNK)
        self.eof = not raw
        self.text = self.text[self.pos :] + self.decoder.decode(raw, final=self.eof)
        self.pos = 0
        return not self.eof

    def advance(self, to: int) -> None:
        seg = self.text[self.pos : to]
        self.byte += len(seg) if seg.isascii() else len(seg.encode("utf-8", "surrogateescape"))
        self.line += seg.count("\n")
        self.pos = to

    def peek(self) -> str | None:
        """The next character that is not white space (None at the end of the file)."""
        while True:
            self.advance(_SPACE.match(self.text, self.pos).end())
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return None


def sniff(path: str | Path) -> str:
    """ "array" (a top-level JSON array) or "lines" (JSON Lines, or empty); a `.json` file that is neither
    is one DataError saying what it holds and what to do."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    text = head.removeprefix(BOM).decode("utf-8", "replace").lstrip(" \t\r\n")
    if not text or text[0] == "[":
        return "array" if text else "lines"
    if not str(path).lower().endswith(".json"):
        return "lines"
    first, newline, _ = text.partition("\n")
    if not newline and len(head) == SNIFF_BYTES:
        return (
            "lines"  # a first line longer than the head (long passages): read as JSON Lines, checked per line
        )
    first = first.strip()
    try:
        json.loads(first)
        return "lines"
    except json.JSONDecodeError:
        pass
    what = "one JSON object spread over several lines" if text[0] == "{" else f"text starting {text[:30]!r}"
    raise DataError(
        f"{path}: neither a JSON array of records nor JSON Lines: it holds {what}. dstrain reads a top-level "
        "array ([{...}, {...}]) or one record per line. If the records sit under a key, write them out one "
        f"per line first, e.g. jq -c '.data[]' {Path(path).name} > records.jsonl"
    )


def iter_elements(path: str | Path, limit: int) -> Iterator[Element]:
    """Every element of the array in `path`; problems of the array itself come as elements with an error."""
    with open(path, "rb") as fh:
        start = 3 if fh.read(3) == BOM else 0
        fh.seek(start)
        buf = _Buffer(fh, start)
        buf.more()
        if buf.peek() != "[":
            raise DataError(f"{path}: not a JSON array (it does not start with '[')")
        buf.advance(buf.pos + 1)
        if buf.peek() == "]":
            buf.advance(buf.pos + 1)
            yield from _after_array(buf, 0)
            return
        yield from _elements(buf, limit)


def _elements(buf: _Buffer, limit: int) -> Iterator[Element]:
    number = 0
    while True:
        element, fatal = _decode_one(buf, number, limit)
        yield element
        if fatal:
            return
        after = buf.peek()
        here = Element(number, buf.line, buf.byte, 0)
        if after == ",":
            buf.advance(buf.pos + 1)
            number += 1
        elif after == "]":
            buf.advance(buf.pos + 1)
            yield from _after_array(buf, number + 1)
            return
        else:
            what = "the file ends" if after is None else f"found {after!r}"
            tail = ": the file is truncated or cut off" if after is None else ""
            yield _failed(here, f"after element {number}: expected ',' or ']', {what}{tail}")
            return


def _after_array(buf: _Buffer, count: int) -> Iterator[Element]:
    if buf.peek() is not None:
        extra = Element(count, buf.line, buf.byte, 0)
        yield _failed(extra, "extra data after the array's closing ']' (ignored)")


def _failed(where: Element, reason: str) -> Element:
    return Element(where.number, where.line, where.offset, where.length, None, reason)


def _decode_one(buf: _Buffer, number: int, limit: int) -> tuple[Element, bool]:
    """The element at the cursor, the cursor moved past it, and whether reading must stop here."""
    if buf.peek() is None:
        return _truncated(number, buf.line, buf.byte, 0), True
    line, offset = buf.line, buf.byte
    while True:  # the cursor stays on the element's first character; more() only appends
        try:
            value, end = _DECODER.raw_decode(buf.text, buf.pos)
        except json.JSONDecodeError as exc:
            cut = exc.msg.startswith("Unterminated string") or exc.pos >= _cut_from(buf)
            if not cut or buf.eof:
                return _broken(buf, number, line, offset, exc, cut), True
            if len(buf.text) - buf.pos > limit:  # chars <= bytes: surely over the limit
                return _skip_over_long(buf, number, line, offset, limit)
            buf.more()
            continue
        if end == len(buf.text) and buf.more():
            continue  # a number may go on in the next chunk
        break
    undecodable = not buf.text[buf.pos : end].isascii() and _UNDECODABLE.search(buf.text, buf.pos, end)
    buf.advance(end)
    element = Element(number, line, offset, buf.byte - offset, value)
    if element.length > limit:
        return _failed(element, f"element {number}: {over_long(element.length, limit)}"), False
    if undecodable:
        return _failed(element, f"element {number}: undecodable bytes (not UTF-8)"), False
    return element, False


def _cut_from(buf: _Buffer) -> int:
    """Where an error means "the text stops here", not "the text is wrong": near the chunk's end, or at the
    end of the file within a partial literal ("tru", "fals")."""
    if not buf.eof:
        return len(buf.text) - _NEAR_END
    stripped = buf.text.rstrip()
    tail = stripped[stripped.rfind(" ") + 1 :].lstrip("[,:{")
    partial = tail and any(word.startswith(tail) and word != tail for word in ("true", "false", "null"))
    return len(stripped) - len(tail) if partial else len(stripped)


def over_long(size: int, limit: int) -> str:
    return f"record is {size} bytes, over the {limit}-byte limit"


def _truncated(number: int, line: int, offset: int, size: int) -> Element:
    reason = f"element {number}: the file ends inside this element (truncated?)"
    return Element(number, line, offset, size, None, reason)


def _broken(
    buf: _Buffer, number: int, line: int, offset: int, exc: json.JSONDecodeError, cut: bool
) -> Element:
    if cut:
        return _truncated(number, line, offset, 0)
    err_line = buf.line + buf.text.count("\n", buf.pos, exc.pos)
    column = exc.pos - buf.text.rfind("\n", 0, exc.pos)
    reason = (
        f"element {number}: invalid JSON ({exc.msg} at line {err_line} column {column}); the rest of the "
        "array cannot be read past it"
    )
    return Element(number, line, offset, 0, None, reason)


def _skip_over_long(buf: _Buffer, number: int, line: int, offset: int, limit: int) -> tuple[Element, bool]:
    """Step over an element too big to hold, by brackets and strings alone; its size is then known."""
    found = _skip_value(buf)
    size = buf.byte - offset
    if not found:
        return _truncated(number, line, offset, size), True
    return Element(number, line, offset, size, None, f"element {number}: {over_long(size, limit)}"), False


def _skip_value(buf: _Buffer) -> bool:
    depth = 0
    while True:
        match = _BRACKET.search(buf.text, buf.pos)
        if match is None:
            buf.advance(len(buf.text))
            if not buf.more():
                return False
            continue
        buf.advance(match.end())
        if match.group() == '"':
            if not _skip_string(buf):
                return False
        elif match.group() in "[{":
            depth += 1
        else:
            depth -= 1
        if depth <= 0:
            return True


def _skip_string(buf: _Buffer) -> bool:
    while True:
        buf.advance(_STRING_BODY.match(buf.text, buf.pos).end())
        if buf.pos < len(buf.text) and buf.text[buf.pos] == '"':
            buf.advance(buf.pos + 1)
            return True
        if not buf.more():
            return False
