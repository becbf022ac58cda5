"""ShareGPT (`sharegpt` -> messages): {"conversations": [{"from": "system"|"human"|"gpt", "value"}]}.

`from` maps to dstrain's roles (human -> user, gpt -> assistant; user/assistant are taken as they are).
Other turns (tool calls, observations) have no place in dstrain's messages format: the record is dropped,
not silently cut, so the count says how much of the file that was.
"""

from __future__ import annotations

from dstrain.data.convert.registry import Drop, Options, register

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _is_sharegpt(obj: dict) -> bool:
    return isinstance(obj.get("conversations"), list)


@register("sharegpt", targets=("messages",), detect=_is_sharegpt)
def sharegpt(obj: dict, to: str, opts: Options) -> dict:
    """ShareGPT: conversations of {from: system | human | gpt, value}."""
    turns = obj["conversations"]
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Drop(f"conversations[{i}] must be an object with from and value")
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise Drop(f"conversations[{i}]: turn from {turn.get('from')!r} is not system, human or gpt")
        messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return {"messages": messages}
