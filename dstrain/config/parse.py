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
            ok, value = coerce(hint, raw[name])
            if ok:
                values[name] = value
            else:
                problems.append(f"{prefix}{name}: expected {describe(hint)}, got {show(raw[name])}")
    return cls(**values)


def coerce(hint: Any, value: Any) -> tuple[bool, Any]:
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint), value
    if origin in (Union, types.UnionType):
        for arm in get_args(hint):
            ok, out = coerce(arm, value)
            if ok:
                return True, out
        return False, value
    if origin is list:
        (item,) = get_args(hint)
        if isinstance(value, str) and item is str:
            return True, [value]  # a single path is a one-element list
        if not isinstance(value, list):
            return False, value
        pairs = [coerce(item, v) for v in value]
        return all(ok for ok, _ in pairs), [v for _, v in pairs]
    if origin is dict:
        key_hint, item = get_args(hint)
        if not isinstance(value, dict):
            return False, value
        pairs = {k: coerce(item, v) for k, v in value.items()}
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


def describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(hint))
    if origin is list:
        return f"a list of {describe(get_args(hint)[0])}"
    if origin is dict:
        return f"a mapping of names to {describe(get_args(hint)[1])}"
    return {bool: "true|false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"
