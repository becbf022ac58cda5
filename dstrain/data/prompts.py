"""The RAG prompt: passages truncated by tokens (whole passages first, the last one cut), query never cut."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def fit_passages(tokenizer: PreTrainedTokenizerBase, passages: Sequence[str], budget: int) -> list[str]:
    """Keep whole passages while they fit in `budget` tokens; cut the first one that does not, then stop."""
    kept: list[str] = []
    left = budget
    for passage in passages:
        if left <= 0:
            break
        ids = tokenizer(passage, add_special_tokens=False)["input_ids"]
        if len(ids) <= left:
            kept.append(passage)
            left -= len(ids)
            continue
        cut = tokenizer.decode(ids[:left], skip_special_tokens=True).rstrip()
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
    prompt = template.replace("{passages}", "\n".join(kept)).replace("{query}", query)
    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt
