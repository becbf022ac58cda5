"""Alpaca (`alpaca` -> messages or sft-rag): {"instruction", "input", "output"} (optional "system").

The prompt is the instruction, then a blank line and the input when there is one. messages: [system?,
user, assistant]; sft-rag: the prompt as the query, no passages, the output as the answer.
"""

from __future__ import annotations

from dstrain.data.convert.registry import Drop, Options, register, text


def _is_alpaca(obj: dict) -> bool:
    return "instruction" in obj and "output" in obj


@register("alpaca", targets=("messages", "sft-rag"), detect=_is_alpaca)
def alpaca(obj: dict, to: str, opts: Options) -> dict:
    """Alpaca: instruction (+ input) as the prompt, output as the answer."""
    prompt, answer = text(obj, "instruction"), text(obj, "output")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise Drop(f"field 'input' must be a string, got {type(extra).__name__}")
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    if to == "sft-rag":
        return {"query": prompt, "retrieval_result": [], "answer": answer}
    system = obj.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return {
        "messages": [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    }
