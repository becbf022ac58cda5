"""Strict dataclass building from parsed YAML: unknown keys (with a close match) and type errors, collected."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, collecting unknown keys and type errors into `problems`."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {show(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    values = {}
    for name in fields:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, raw[name], f"{prefix}{name}.", problems)
        else:
            ok, value = coerce(hint, raw[name], f"{prefix}{name}", problems)
            if ok:
                values[name] = value
            else:
                problems.append(f"{prefix}{name}: expected {describe(hint)}, got {show(raw[name])}")
    return cls(**values)


def coerce(hint: Any, value: Any, where: str = "", problems: list[str] | None = None) -> tuple[bool, Any]:
    """(whether `value` fits `hint`, the value as built). A mapping that fits a dataclass arm is built with
    `build`: its own problems (an unknown key, a wrong type inside it) go to `problems`, named by `where`."""
    origin = get_origin(hint)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads `off` (and no/false) as False, `on` as True
            word = "on" if value else "off"
            return word in get_args(hint), word
        return value in get_args(hint), value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            return False, value
        found: list[str] = []
        built = build(hint, value, f"{where}.", found)
        if problems is not None:
            problems.extend(found)
        return True, built  # it is this arm; its problems are reported by key
    if origin in (Union, types.UnionType):
        for arm in get_args(hint):
            ok, out = coerce(arm, value, where, problems)
            if ok:
                return True, out
        return False, value
    if origin is list:
        (item,) = get_args(hint)
        if isinstance(value, (str, dict)):  # a single path (or source mapping) is a one-element list
            ok, out = coerce(item, value, where, problems)
            return ok, [out]
        if not isinstance(value, list):
            return False, value
        pairs = [coerce(item, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        wrong = [i for i, (ok, _) in enumerate(pairs) if not ok]
        if wrong and problems is not None and holds_mappings(item):  # name the items, not the whole list
            problems += [f"{where}[{i}]: expected {describe(item)}, got {show(value[i])}" for i in wrong]
            return True, [v for _, v in pairs]
        return not wrong, [v for _, v in pairs]
    if origin is dict:
        key_hint, item = get_args(hint)
        if not isinstance(value, dict):
            return False, value
        pairs = {k: coerce(item, v, f"{where}.{k}", problems) for k, v in value.items()}
        keys_ok = all(coerce(key_hint, k)[0] for k in value)
        return keys_ok and all(ok for ok, _ in pairs.values()), {k: v for k, (_, v) in pairs.items()}
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if hint is type(None):
        return value is None, value
    raise TypeError(f"unsupported config type {hint}")


def holds_mappings(hint: Any) -> bool:
    """Whether `hint` is a dataclass or a union with one (a list of them reports each bad item by index)."""
    return dataclasses.is_dataclass(hint) or any(dataclasses.is_dataclass(arm) for arm in get_args(hint))


def describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(hint))
    if origin is list:
        return f"a list of {describe(get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping {" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    if origin is dict:
        return f"a mapping of names to {describe(get_args(hint)[1])}"
    return {bool: "true|false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"
