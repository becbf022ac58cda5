"""The RAG prompt: passages truncated by tokens (whole passages first, the last one cut), query never cut; and
the tokenizer's chat template, applied as each model family's template demands (data.chat_template)."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

SEPARATOR = "\n"
PLACEHOLDER = re.compile(r"\{(\w+)\}")  # {passages}, {query}


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
    prompt = fill_template(template, passages=SEPARATOR.join(kept), query=query)
    if chat:
        prompt = render_chat(tokenizer, [_turn("user", prompt)], generation_prompt=True)
    return prompt


def fill_template(template: str, **values: str) -> str:
    """Each `{name}` of the template replaced by its value in one pass: a passage that says `{query}` (code and
    documentation corpora do) or a query that says `{passages}` stays as written. Other braces stay too."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# ------------------------------------------------------------------------------------ chat templates
# Each model family's template has its own rules (tests/fixtures/chat_templates holds the real ones): Gemma-2
# refuses a system role and demands strict user/assistant alternation, Llama-3 ends a turn with <|eot_id|>,
# ChatML with <|im_end|>, Mistral with EOS. dstrain adapts a conversation only where the template refuses it,
# so a template that accepts a conversation renders it exactly as the family's own tooling does.

FOLD_SEPARATOR = "\n\n"  # how Gemma-3's own template joins the system message to the first user turn
_SENTINEL = "\x00dstrain-answer\x00"  # an answer no template rewrites, to find what follows one
_said: set[str] = set()


def say_once(message: str) -> None:
    """One line in the run log per process, however many records meet the same fact."""
    if message not in _said:
        _said.add(message)
        print(f"note: {message}", file=sys.stderr)


@dataclass(frozen=True)
class ChatFormat:
    """What a tokenizer's chat template puts after an assistant answer, found once by rendering one."""

    after_answer: str  # all the template renders after the answer's text, e.g. "<end_of_turn>\n"
    end_of_turn: str  # its first special token through which the answer is labelled; "" if there is none


_formats: dict[tuple[int, str, int], ChatFormat] = {}


def chat_format(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The template's answer ending, probed with one short exchange (cached per tokenizer and template)."""
    key = (id(tokenizer), tokenizer.chat_template or "", len(tokenizer))
    if key not in _formats:
        try:
            text = render_chat(tokenizer, [_turn("user", "Q"), _turn("assistant", _SENTINEL)], False)
        except ValueError:  # a template that refuses even this: nothing known, answers end in EOS
            text = _SENTINEL
        after = text[text.rindex(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in text else ""
        _formats[key] = ChatFormat(after, after[: _end_of_first_special(tokenizer, after)])
    return _formats[key]


def _end_of_first_special(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Where the first special token in `text` ends (0 if none): the end-of-turn marker of a template."""
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    found = [(text.find(s), -len(s)) for s in specials | set(tokenizer.all_special_tokens) if s and s in text]
    if not found:
        return 0
    start, minus_len = min(found)
    return start - minus_len


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the chat template's end-of-turn token: what generation must stop at."""
    ids = [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None):
        end = chat_format(tokenizer).end_of_turn
        end_id = tokenizer.convert_tokens_to_ids(end) if end else None
        if isinstance(end_id, int) and end_id not in ids and end_id != tokenizer.unk_token_id:
            ids.append(end_id)
    return ids


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    """The template's text for `messages`; a refusal is a ValueError (a bad record, data.on_error decides)."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as exc:
        raise ValueError(f"the tokenizer's chat template refused this conversation: {exc}") from None


def fit_to_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[dict]:
    """The conversation as the template accepts it: unchanged if it renders, else with a refused system role
    folded into the first user turn and same-role turns merged where the template demands alternation."""
    for _ in range(3):
        try:
            tokenizer.apply_chat_template(messages, tokenize=False)
            return messages
        except TemplateError as exc:
            why = str(exc).lower()
            fitted = messages
            if "alternate" in why:  # before "system": Mistral's alternation message names the system message
                fitted = _merge_same_roles(messages)
            elif "system" in why:
                fitted = _fold_system(messages)
                if fitted != messages:
                    say_once(
                        f"the chat template of {tokenizer.name_or_path} has no system role: system messages are "
                        "folded into the first user turn"
                    )
            if fitted == messages:
                raise ValueError(f"the tokenizer's chat template refused this conversation: {exc}") from None
            messages = fitted
    return messages


def _fold_system(messages: list[dict]) -> list[dict]:
    """Leading system messages become the start of the first user turn, as Gemma-3's own template does."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    rest = messages[lead:]
    if not lead or not rest or rest[0]["role"] != "user":
        return messages
    system = FOLD_SEPARATOR.join(m["content"] for m in messages[:lead])
    return [_turn("user", system + FOLD_SEPARATOR + rest[0]["content"]), *rest[1:]]


def _merge_same_roles(messages: list[dict]) -> list[dict]:
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = _turn(message["role"], merged[-1]["content"] + FOLD_SEPARATOR + message["content"])
        else:
            merged.append(dict(message))
    return merged
