"""RAFT (`raft` -> sft-rag): {"question", "context": {"sentences": [[str]], "title": [[str]]},
"oracle_context", "cot_answer", "instruction"}.

The passages are every string of `context.sentences`, in order (RAFT's generator stores all documents of a
question, oracle and distractors, as one inner list). The answer is the whole `cot_answer` (RAFT trains on
the chain of thought), or with `--final-answer` only the text after its `<ANSWER>:` marker. `instruction`
(the documents and question already rendered into a prompt) is not used: dstrain renders its own prompt.
"""

from __future__ import annotations

from dstrain.data.convert.registry import Drop, Options, mapping, register, text

MARKER = "<ANSWER>:"


def _is_raft(obj: dict) -> bool:
    return "question" in obj and "cot_answer" in obj


def _sentences(obj: dict) -> list[str]:
    value = mapping(obj, "context").get("sentences")
    if not isinstance(value, list):
        raise Drop("field 'context.sentences' must be a list of lists of strings")
    out = []
    for i, group in enumerate(value):
        items = group if isinstance(group, list) else [group]
        for j, item in enumerate(items):
            if not isinstance(item, str):
                raise Drop(f"context.sentences[{i}][{j}] must be a string, got {type(item).__name__}")
            out.append(item)
    return out


@register("raft", targets=("sft-rag",), detect=_is_raft)
def raft(obj: dict, to: str, opts: Options) -> dict:
    """RAFT: question, context.sentences as passages, cot_answer (whole, or after <ANSWER>:) as the answer."""
    answer = text(obj, "cot_answer")
    if opts.final_answer:
        if MARKER not in answer:
            raise Drop(f"no '{MARKER}' in cot_answer")
        answer = answer.rsplit(MARKER, 1)[1].strip()
    return {"query": text(obj, "question"), "retrieval_result": _sentences(obj), "answer": answer}
