"""The converter registry: one small function per upstream family, plus how to recognise its records.

A converter takes one decoded upstream record and returns one record in a dstrain format (a dict), or a list
of them (a DDR sample's scored answers, each a kto record), or raises `Drop(reason)`. What it returns is validated (and cleaned) exactly as training reads it before it is written,
so a converter only maps fields; it need not check what `dstrain validate-data` checks.

Adding a family is one decorated function (and one test):

    @register("myformat", targets=("sft-rag",), detect=lambda obj: "my_field" in obj)
    def myformat(obj: dict, to: str, opts: Options) -> dict: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dstrain.config.sources import FORMATS  # dstrain's record formats, listed once
from dstrain.errors import DataError


class Drop(ValueError):  # noqa: N818 - it is not an error of the run: a record left out, with the reason
    """This record cannot be converted; the message is the reason, counted in the summary."""


@dataclass(frozen=True)
class Options:
    """Mapping choices that only some families read (each family's module says which)."""

    pick_by: str | None = (
        None  # ddr: re-pick chosen/rejected from `context` by this score field (kto: label by it)
    )
    min_margin: float | None = None  # ddr: drop pairs whose score margin is below this
    strip_wrapper: bool = False  # kbalign: drop the literal "User: " ... "\nAssistant: " around the prompt
    final_answer: bool = False  # raft: train on the text after <ANSWER>: instead of the whole cot_answer
    passages_from: str | None = None  # rageval: "prediction" | "ground_truth" (default: prediction, else gt)
    threshold: float | None = None  # ddr -> kto: answers scoring at least this are desirable (default 0.5)


Convert = Callable[[dict, str, Options], dict | list[dict]]


@dataclass(frozen=True)
class Converter:
    name: str
    targets: tuple[str, ...]  # the dstrain formats it can produce
    detect: Callable[[dict], bool]  # does this decoded record look like this family?
    convert: Convert
    about: str  # one line for --help and the README


CONVERTERS: dict[str, Converter] = {}  # the families' `detect` tests exclude each other: order is free


def register(
    name: str, targets: tuple[str, ...], detect: Callable[[dict], bool]
) -> Callable[[Convert], Convert]:
    def add(fn: Convert) -> Convert:
        about = (fn.__doc__ or name).strip().splitlines()[0]
        CONVERTERS[name] = Converter(name, targets, detect, fn, about)
        return fn

    return add


def get(name: str, to: str) -> Converter:
    """The converter for `--from name`, checked against `--to`; a bad choice is one DataError."""
    if to not in FORMATS:
        raise DataError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    if name not in CONVERTERS:
        raise DataError(f"--from must be one of {', '.join(CONVERTERS)} or auto, got {name!r}")
    found = CONVERTERS[name]
    if to not in found.targets:
        raise DataError(f"--from {name} cannot produce --to {to}; it produces {', '.join(found.targets)}")
    return found


def detect(sample: list[Any]) -> str | None:
    """The family most of the sampled records look like (first match per record), or None."""
    votes: dict[str, int] = {}
    for obj in sample:
        if not isinstance(obj, dict):
            continue
        for name, conv in CONVERTERS.items():
            if _safe(conv.detect, obj):
                votes[name] = votes.get(name, 0) + 1
                break
    return max(votes, key=votes.__getitem__) if votes else None


def _safe(check: Callable[[dict], bool], obj: dict) -> bool:
    try:
        return bool(check(obj))
    except (AttributeError, KeyError, TypeError, IndexError):
        return False


# ------------------------------------------------------------------------------------- field helpers


def text(obj: Any, key: str, where: str = "") -> str:
    """A non-empty string field, or Drop naming it."""
    name = f"{where}{key}"
    if not isinstance(obj, dict) or key not in obj or obj[key] is None:
        raise Drop(f"missing field '{name}'")
    value = obj[key]
    if not isinstance(value, str):
        raise Drop(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise Drop(f"field '{name}' is empty")
    return value


def strings(obj: Any, key: str, where: str = "", required: bool = True) -> list[str]:
    """A list of strings (None or absent: [] unless required); non-string items are a Drop."""
    name = f"{where}{key}"
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None:
        if required:
            raise Drop(f"missing field '{name}'")
        return []
    if not isinstance(value, list):
        raise Drop(f"field '{name}' must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise Drop(f"{name}[{i}] must be a string, got {type(item).__name__}")
    return value


def mapping(obj: Any, key: str) -> dict:
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None:
        raise Drop(f"missing field '{key}'")
    if not isinstance(value, dict):
        raise Drop(f"field '{key}' must be an object, got {type(value).__name__}")
    return value
