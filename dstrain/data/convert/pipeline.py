"""`dstrain convert`: read upstream files, map each record, validate it as training will, write atomically.

Each output record goes through `records.parse_counted` (the validation and cleaning training applies) and
is written from the parsed record, so everything in DST passes `dstrain validate-data`. DST is written to a
temporary sibling and renamed into place only when the conversion finished and wrote something.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dstrain.checkpoint.atomic import atomic_file
from dstrain.data.convert import registry, sources
from dstrain.data.convert.registry import Converter, Drop, Options
from dstrain.data.records import parse_counted, record_to_json
from dstrain.errors import DataError

Report = Callable[[str], None]


@dataclass
class Summary:
    read: int = 0
    written: int = 0
    cleaned: int = 0  # written records that cleaning changed
    dropped: Counter = field(default_factory=Counter)  # reason (numbers masked) -> count
    families: dict[str, str] = field(default_factory=dict)  # source -> family used

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def lines(self, out: Path, to: str) -> list[str]:
        where = f"-> {out}" if self.written else f"nothing written, {out} not created"
        head = (
            f"converted to {to}: {self.read} read, {self.written} written, {self.num_dropped} dropped {where}"
        )
        body = [f"  dropped {n:>8}  {reason}" for reason, n in self.dropped.most_common()]
        if self.cleaned:
            body.append(
                f"  cleaned {self.cleaned:>8}  (Unicode NFC, control characters, trailing white space)"
            )
        return [head, *body]


def reason_key(reason: str) -> str:
    """A drop reason without its particulars (element numbers, columns), for counting by reason."""
    reason = re.sub(r"^element \d+: ", "", reason)
    return re.sub(r"\b\d+\b", "N", reason.split(" (", 1)[0] if reason.startswith("invalid JSON") else reason)


def pick_family(path: Path, family: str, to: str, report: Report) -> Converter:
    if family != "auto":
        return registry.get(family, to)
    found = registry.detect(sources.sample(path))
    if found is None:
        raise DataError(
            f"{path}: cannot tell which upstream shape this is from its first records; pass --from "
            f"({', '.join(registry.CONVERTERS)})"
        )
    report(f"{path}: --from auto picked {found} ({registry.CONVERTERS[found].about})")
    return registry.get(found, to)


def convert_one(conv: Converter, value: object, to: str, opts: Options) -> list[tuple[dict, bool]]:
    """The dstrain records for one upstream value (usually one), validated and cleaned as training reads
    them, each with whether cleaning changed it. One that fails validation drops them all."""
    if not isinstance(value, dict):
        raise Drop(f"expected a JSON object, got {type(value).__name__}")
    try:
        converted = conv.convert(value, to, opts)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        # A record of another shape than the forced --from expects: dropped with the field, not a traceback.
        raise Drop(f"not a {conv.name} record ({type(exc).__name__}: {exc})") from None
    out = []
    for one in converted if isinstance(converted, list) else [converted]:
        record, changed = parse_counted(one, to, clean=True)
        out.append((record_to_json(record), changed))
    return out


def convert_file(
    path: Path, conv: Converter, to: str, opts: Options, out: IO[str], summary: Summary, report: Report
) -> None:
    for item in sources.iter_items(path):
        summary.read += 1
        try:
            if item.error is not None:
                raise Drop(item.error)
            converted = convert_one(conv, item.value, to, opts)
        except ValueError as exc:  # Drop, or the validation's reason
            where = "" if item.element is None or item.error else f"element {item.element}: "
            report(f"{path}:{item.line}: {where}{exc}")
            summary.dropped[reason_key(str(exc))] += 1
            continue
        for record, changed in converted:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary.written += 1
            summary.cleaned += changed


class _NothingWritten(Exception):  # noqa: N818 - control flow: leave no DST behind
    """Raised inside `atomic_file` so that an empty result is discarded like a failed one."""


def convert_files(
    paths: list[Path], family: str, to: str, out: Path, opts: Options | None = None, report: Report = print
) -> Summary:
    """Convert `paths` (each JSONL or a JSON array) from `family` ("auto": detected per file) to `to`."""
    opts = opts or Options()
    if opts.passages_from not in (None, "prediction", "ground_truth"):
        raise DataError(f"--passages-from must be prediction or ground_truth, got {opts.passages_from!r}")
    if opts.threshold is not None and to != "kto":
        raise DataError(f"--threshold labels DDR answers for --to kto; it does nothing for --to {to}")
    if family != "auto":
        registry.get(family, to)  # a bad --from/--to fails before anything is read
    elif to not in registry.FORMATS:
        registry.get(next(iter(registry.CONVERTERS)), to)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"no such file: {', '.join(missing)}")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: the directory {out.parent} does not exist")
    summary = Summary()
    try:
        with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as fh:
            for path in paths:
                conv = pick_family(path, family, to, report)
                summary.families[str(path)] = conv.name
                convert_file(path, conv, to, opts, fh, summary, report)
            if not summary.written:
                raise _NothingWritten
    except _NothingWritten:
        pass
    return summary


def convert_command(paths: list[Path], family: str, to: str, out: Path, strict: bool, opts: Options) -> int:
    """What `dstrain convert` does: the per-record reports, the summary, and the exit code."""
    summary = convert_files(paths, family, to, out, opts)
    for line in summary.lines(out, to):
        print(line)
    if not summary.written:
        return 1
    return 1 if strict and summary.num_dropped else 0
