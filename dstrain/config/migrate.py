"""Run-config schema versions: an old config still loads after a key is renamed or changes meaning.

A run config may say which schema it follows (`version: 1`); one without the key is schema 1, which every
config written before the key existed follows. `MIGRATIONS[v]` lists what changed from schema v to v + 1;
`upgrade` applies each step in order, says one line per migrated key, and sets `version` to the current
schema. A version newer than this dstrain knows is an error naming both. Unknown keys stay errors: they
are checked after the migration, by the strict parse.

Nothing has been renamed yet, so the table is empty. A change of a key's name or meaning bumps
CONFIG_VERSION and adds its step here (and a golden fixture, see docs/releasing.md).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dstrain import __version__
from dstrain.errors import ConfigError

CONFIG_VERSION = 1


@dataclass(frozen=True)
class Rename:
    """`old` (a dotted key) became `new`; `convert` maps an old value to its new meaning (None: the same)."""

    old: str
    new: str
    convert: Callable[[Any], Any] | None = None
    why: str = ""


MIGRATIONS: dict[int, list[Rename]] = {}


def pop_key(raw: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """Remove `a.b.c` from nested dicts: (True, value) if it was there."""
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return False, None
    return True, node.pop(last)


def has_key(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def schema_version(raw: dict[str, Any], current: int) -> int:
    version = raw.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError([f"version: expected a config schema version >= 1, got {version!r}"])
    if version > current:
        raise ConfigError(
            [
                f"version: {version} is a newer config schema than this dstrain {__version__} reads "
                f"(up to version {current}); upgrade dstrain (pip install -U dstrain)"
            ]
        )
    return version


def apply_step(raw: dict[str, Any], step: int, renames: list[Rename]) -> list[str]:
    """Apply the changes from schema `step` to `step + 1`; one note per key that was there."""
    notes = []
    for rename in renames:
        found, value = pop_key(raw, rename.old)
        if not found:
            continue
        why = f" ({rename.why})" if rename.why else ""
        if has_key(raw, rename.new):  # e.g. a --set of the new key on an old config: the explicit one wins
            notes.append(f"{rename.old} (config version {step}) dropped: {rename.new} is set{why}")
            continue
        new_value = rename.convert(value) if rename.convert else value
        set_key(raw, rename.new, new_value)
        change = f" = {new_value!r}" if rename.convert else ""
        notes.append(f"{rename.old} (config version {step}) is now {rename.new}{change}{why}")
    return notes


def migrate(
    raw: dict[str, Any], table: dict[int, list[Rename]] | None = None, current: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """(the config in the current schema, one note per migrated key). `raw` is left untouched."""
    table = MIGRATIONS if table is None else table
    current = CONFIG_VERSION if current is None else current
    if not isinstance(raw, dict):
        return raw, []  # the strict parse reports a config that is no mapping
    version = schema_version(raw, current)
    out, notes = copy.deepcopy(raw), []
    for step in range(version, current):
        notes += apply_step(out, step, table.get(step, []))
    out["version"] = current
    return out, notes


def upgrade(raw: dict[str, Any], source: str = "run config") -> dict[str, Any]:
    """`migrate`, with each note printed once (by rank 0 of a launch) as `SOURCE: config: NOTE`."""
    try:
        out, notes = migrate(raw)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=source) from None
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"{source}: config: {note}", file=sys.stderr)
    return out
