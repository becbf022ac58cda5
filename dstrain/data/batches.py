"""Tokenise records into (input_ids, labels) with prompt tokens masked, and pad them into batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from dstrain.config.run import DataConfig
from dstrain.data.prompts import chat_format, fit_to_template, render_chat, render_rag_prompt
from dstrain.data.records import BadRecord, MessagesRecord, RagRecord, Record

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    source: int = 0  # a mixture's source it came from (config/sources.py), in data.train order

    @property
    def supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def rag_prompt_ids(tokenizer: PreTrainedTokenizerBase, record: RagRecord, cfg: DataConfig) -> list[int]:
    """The prompt tokens of SFT rows and preference pairs alike (one prompt, one way)."""
    return rag_tokens(tokenizer, record, cfg)[0]


def rag_tokens(
    tokenizer: PreTrainedTokenizerBase, record: RagRecord, cfg: DataConfig, *answers: str
) -> tuple[list[int], list[list[int]]]:
    """The prompt tokens and each answer's labelled tokens, for SFT rows and preference pairs alike.

    Plain: BOS as the tokenizer adds it, the prompt; " answer" + EOS. With data.chat_template: the template's
    user turn and generation prompt, with BOS only where the template writes it (never a second one from the
    tokenizer); each answer as the template renders the assistant turn after that prompt, through the
    template's end-of-turn token (<|eot_id|>, <end_of_turn>, <|im_end|>; EOS where the template ends a turn
    with no special token), so the model learns to stop where the family's chat format stops it.
    """
    text = render_rag_prompt(
        tokenizer, cfg.prompt_template, record.query, record.passages, cfg.max_passage_tokens
    )
    if not cfg.chat_template:
        return _ids(tokenizer, text, special=True), [answer_ids(tokenizer, answer) for answer in answers]
    user = [{"role": "user", "content": text}]
    prompt = render_chat(tokenizer, user, generation_prompt=True)
    prompt_ids = _ids(tokenizer, prompt, special=False)
    return prompt_ids, [chat_answer_ids(tokenizer, user, prompt, prompt_ids, answer) for answer in answers]


def answer_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """ " answer" + EOS, whitespace normalised: EOS teaches (and scores) where to stop."""
    ids = _ids(tokenizer, " " + text.strip(), special=False)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def chat_answer_ids(
    tokenizer: PreTrainedTokenizerBase, user: list[dict], prompt: str, prompt_ids: list[int], answer: str
) -> list[int]:
    """The assistant turn the template renders after `prompt`, through its end-of-turn token; template
    whitespace after that token (Gemma's and ChatML's newline) is not something to learn."""
    full = render_chat(tokenizer, [*user, {"role": "assistant", "content": answer.strip()}], False)
    if not full.startswith(prompt):
        raise ValueError(
            "the tokenizer's chat template renders the prompt differently once an answer follows it; "
            "cannot tell the answer's tokens from the prompt's"
        )
    fmt = chat_format(tokenizer)
    turn = full[len(prompt) :]
    if fmt.after_answer and turn.endswith(fmt.after_answer):
        turn = turn[: len(turn) - len(fmt.after_answer)] + fmt.end_of_turn
    ids = _following(tokenizer, prompt, prompt_ids, turn)
    if not fmt.end_of_turn and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _following(
    tokenizer: PreTrainedTokenizerBase, prompt: str, prompt_ids: list[int], text: str
) -> list[int]:
    """`text`'s tokens as they follow the prompt: tokenised with it (a SentencePiece tokenizer marks a word
    that starts a text, not one that follows a special token), alone if tokens would merge across the two."""
    joint = _ids(tokenizer, prompt + text, special=False)
    if joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids) :]
    return _ids(tokenizer, text, special=False)


def answer_room(prompt_len: int, cfg: DataConfig) -> int:
    """Tokens left for an answer; a prompt that leaves none is an error."""
    room = cfg.max_seq_len - prompt_len
    if room < 1:
        raise ValueError(
            f"over-long record: the prompt alone is {prompt_len} tokens (query + passages cut to "
            f"{cfg.max_passage_tokens}), data.max_seq_len is {cfg.max_seq_len}"
        )
    return room


def tokenize_rag(tokenizer: PreTrainedTokenizerBase, record: RagRecord, cfg: DataConfig) -> Example:
    """Prompt (masked) + answer (labelled, see rag_tokens); an answer that does not fit is cut, a prompt that
    does not is an error."""
    prompt_ids, (answer,) = rag_tokens(tokenizer, record, cfg, record.answer)
    answer = answer[: answer_room(len(prompt_ids), cfg)]
    return Example(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer)


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase, record: MessagesRecord, max_seq_len: int
) -> Example:
    """Chat-template the conversation; only assistant turns carry labels, each through its end-of-turn token."""
    messages = [{"role": role, "content": content} for role, content in record.messages]
    messages = fit_to_template(tokenizer, messages)
    full = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(full)
    turn_end = _end_of_turn_id(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        if full[:end] != _render(tokenizer, messages[: i + 1], generation_prompt=False):
            raise ValueError(
                "the tokenizer's chat template does not render turns as prefixes; cannot mask turns"
            )
        end = _through_last_eos(full, start, end, turn_end)
        labels[start:end] = full[start:end]
    example = Example(full[:max_seq_len], labels[:max_seq_len])
    if example.supervised == 0:
        raise ValueError(f"over-long record: no assistant token falls within data.max_seq_len={max_seq_len}")
    return example


def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends an assistant turn: the template's end-of-turn token, else EOS."""
    end = chat_format(tokenizer).end_of_turn
    end_id = tokenizer.convert_tokens_to_ids(end) if end else None
    return end_id if isinstance(end_id, int) and end_id != tokenizer.unk_token_id else tokenizer.eos_token_id


def _through_last_eos(ids: list[int], start: int, end: int, eos_id: int | None) -> int:
    """End a turn's labels at its end-of-turn token: template whitespace after it is not something to learn."""
    for pos in range(end - 1, start - 1, -1):
        if ids[pos] == eos_id:
            return pos + 1
    return end


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    return _ids(tokenizer, render_chat(tokenizer, messages, generation_prompt), special=False)


def tokenize_record(tokenizer: PreTrainedTokenizerBase, record: Record, cfg: DataConfig) -> Example:
    if isinstance(record, MessagesRecord):
        return tokenize_messages(tokenizer, record, cfg.max_seq_len)
    return tokenize_rag(tokenizer, record, cfg)


@dataclass
class SourceBatch:
    """A mixture's micro batch by source: counted on the host, `groups` handed to the device with the batch."""

    groups: torch.Tensor  # SFT: each position's source [rows, seq]; pairs: each pair's source [pairs]
    units: list[int]  # per source: supervised tokens (SFT) or real pairs (preference objectives)
    tokens: list[int]  # per source: non-padding tokens


@dataclass
class MicroBatch:
    """What the loop feeds one forward: model inputs plus the counts metrics need."""

    inputs: dict[str, torch.Tensor]
    tokens: int  # real (non-padding) tokens
    samples: int  # good examples; bad ones were dropped (data.on_error decides what that means)
    bad: list[BadRecord]
    indices: list[int] = field(default_factory=list)  # pair batches: each pair's corpus index, in row order
    sources: SourceBatch | None = None  # a mixture's per-source counts (data/source_batch.py)
    desirable: torch.Tensor | None = None  # KTO batches: each example's label [B] (True: desirable)


def collate(examples: Sequence[Example], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to `multiple_of`); padding carries no loss."""
    longest = max(len(e.input_ids) for e in examples)
    length = -(-longest // multiple_of) * multiple_of
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
