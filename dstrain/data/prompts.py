"""The RAG prompt: passages truncated by tokens (whole passages first, the last one cut), query never cut."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

SEPARATOR = "\n"


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_to_tokens(tokenizer: PreTrainedTokenizerBase, ids: list[int], budget: int) -> str:
    """The longest prefix of `ids` within `budget` tokens that decodes to whole characters.

    Byte-level tokenizers can split a multi-byte character (Chinese text) across tokens: a cut there would
    decode to U+FFFD, which re-tokenises into more tokens than it replaced.
    """
    for end in range(min(budget, len(ids)), 0, -1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True).rstrip()
        if "\ufffd" not in text and _count(tokenizer, text) <= budget:
            return text
    return ""


def fit_passages(tokenizer: PreTrainedTokenizerBase, passages: Sequence[str], budget: int) -> list[str]:
    """Keep whole passages while they fit in `budget` tokens (separators counted); cut the next one, stop."""
    kept: list[str] = []
    left = budget
    sep_cost = _count(tokenizer, SEPARATOR)
    for passage in passages:
        if kept:
            left -= sep_cost
        if left <= 0:
            break
        ids = tokenizer(passage, add_special_tokens=False)["input_ids"]
        if len(ids) <= left:
            kept.append(passage)
            left -= len(ids)
            continue
        cut = cut_to_tokens(tokenizer, ids, left)
        if cut:
            kept.append(cut)
        break
    return kept


def render_rag_prompt(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    query: str,
    passages: Sequence[str],
    max_passage_tokens: int,
    chat: bool = False,
) -> str:
    """Fill the template; with `chat`, wrap it as the user turn of the tokenizer's chat template."""
    kept = fit_passages(tokenizer, passages, max_passage_tokens)
    prompt = template.replace("{passages}", SEPARATOR.join(kept)).replace("{query}", query)
    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt
