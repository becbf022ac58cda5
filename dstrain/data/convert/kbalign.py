"""KBAlign SFT output (`kbalign` -> messages or sft-rag), in its three variants:
(a) a JSON array of {"messages": [user, assistant], "golden_reference": str | null};
(b) JSONL {"index", "data": {"messages": [...]}, "golden_reference"};
(c) JSONL {"id", "data": [prompt, answer]}.

The user turn carries a literal "User: " ... " \\nAssistant: " wrapper (KBAlign's own prompt format).
- messages: the turns as they are; `--strip-wrapper` removes the wrapper (do so when the tokenizer's chat
  template adds its own role markers, or the model learns both).
- sft-rag: the references listed after "References: \\n" as "1. ...\\n2. ..." become `retrieval_result`
  (none listed: an empty list; `golden_reference` is not used, it is the chunk the question was made
  from, not what the model was shown), and the query is the text after "Now the question is:" (without
  "Please answer this question."), else the whole prompt without wrapper and references.
"""

from __future__ import annotations

import re

from dstrain.data.convert.registry import Drop, Options, register

_HEAD = "User: "
_TAIL = re.compile(r"\s*\n?Assistant:\s*$")
_REFERENCES = re.compile(r"References:\s*\n(?P<refs>.*?)(?=\nNow the question is:|\Z)", re.S)
_NUMBERED = re.compile(r"(?:^|\n)\d+\.\s")
_QUESTION = re.compile(r"Now the question is:\s*(?P<q>.*?)\s*(?:Please answer this question\.?)?\s*$", re.S)


def _is_kbalign(obj: dict) -> bool:
    data = obj.get("data")
    if "golden_reference" in obj and ("messages" in obj or isinstance(data, dict)):
        return True
    return isinstance(data, list) and ("id" in obj or "index" in obj)


def strip_wrapper(prompt: str) -> str:
    """The prompt without KBAlign's "User: " ... "\\nAssistant: " wrapper (unchanged if it has none)."""
    if prompt.startswith(_HEAD):
        prompt = prompt[len(_HEAD) :]
    return _TAIL.sub("", prompt)


def split_prompt(prompt: str) -> tuple[str, list[str]]:
    """(query, references) of a KBAlign user turn."""
    body = strip_wrapper(prompt)
    refs: list[str] = []
    found = _REFERENCES.search(body)
    if found:
        refs = [r.strip() for r in _NUMBERED.split(found.group("refs")) if r.strip()]
        body = body[: found.start()] + body[found.end() :]
    question = _QUESTION.search(body)
    query = question.group("q") if question else body
    return query.strip(), refs


def _turns(obj: dict) -> list:
    data = obj.get("data")
    if "messages" in obj:
        turns = obj["messages"]
    elif isinstance(data, dict):
        turns = data.get("messages")
    elif isinstance(data, list):
        if len(data) != 2:
            raise Drop(f"field 'data' must be [prompt, answer], got {len(data)} items")
        turns = [{"role": "user", "content": data[0]}, {"role": "assistant", "content": data[1]}]
    else:
        raise Drop("no 'messages' and no 'data' to read the turns from")
    if not isinstance(turns, list) or not turns:
        raise Drop("field 'messages' must be a non-empty list of {role, content}")
    return turns


@register("kbalign", targets=("messages", "sft-rag"), detect=_is_kbalign)
def kbalign(obj: dict, to: str, opts: Options) -> dict:
    """KBAlign SFT output: messages (+ golden_reference), {data: {messages}}, or {id, data: [prompt, answer]}."""
    turns = _turns(obj)
    if to == "messages":
        if opts.strip_wrapper:
            turns = [_stripped(t) for t in turns]
        return {"messages": turns}
    users = [t for t in turns if isinstance(t, dict) and t.get("role") == "user"]
    answers = [t for t in turns if isinstance(t, dict) and t.get("role") == "assistant"]
    if len(users) != 1 or len(answers) != 1:
        raise Drop("sft-rag needs one user and one assistant turn")
    prompt = users[0].get("content")
    if not isinstance(prompt, str):
        raise Drop(f"the user turn's content must be a string, got {type(prompt).__name__}")
    query, refs = split_prompt(prompt)
    return {"query": query, "retrieval_result": refs, "answer": answers[0].get("content")}


def _stripped(turn: object) -> object:
    if isinstance(turn, dict) and turn.get("role") == "user" and isinstance(turn.get("content"), str):
        return {**turn, "content": strip_wrapper(turn["content"])}
    return turn
