"""RAG prompt (passages cut by tokens, query never), label masking, chat turns, collate padding."""

from __future__ import annotations

import pytest
import torch

from dstrain.config.run import DEFAULT_TEMPLATE, DataConfig
from dstrain.data.batches import IGNORE, Example, collate, tokenize_messages, tokenize_rag, tokenize_record
from dstrain.data.prompts import fit_passages, render_rag_prompt
from dstrain.data.records import MessagesRecord, RagRecord

PASSAGES = (
    "The river Quodalam flows into Lake Thuthek. The Quodalam is a winding river lined with willows.",
    "The river Tafadresh flows into Lake Saehan.",
    "The river Drialourn flows into Lake Fikrul.",
)
QUERY = "Into which lake does the river Quodalam flow?"


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def ntok(tokenizer, text: str) -> int:
    return len(ids(tokenizer, text))


def labelled(example: Example) -> list[int]:
    return [label for label in example.labels if label != IGNORE]


def segments(example: Example) -> list[list[int]]:
    """Runs of consecutive labelled tokens."""
    out: list[list[int]] = []
    previous = IGNORE
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            if previous == IGNORE:
                out.append([])
            out[-1].append(token)
        previous = label
    return out


# ------------------------------------------------------------------------------------- fit_passages


def test_everything_fits(tokenizer):
    assert fit_passages(tokenizer, PASSAGES, 10_000) == list(PASSAGES)


def test_budget_zero_keeps_nothing(tokenizer):
    assert fit_passages(tokenizer, PASSAGES, 0) == []


def test_exact_fit_keeps_whole_passage_and_stops(tokenizer):
    first = ntok(tokenizer, PASSAGES[0])
    assert fit_passages(tokenizer, PASSAGES, first) == [PASSAGES[0]]
    two = first + ntok(tokenizer, "\n") + ntok(tokenizer, PASSAGES[1])  # the separator counts too
    assert fit_passages(tokenizer, PASSAGES, two) == list(PASSAGES[:2])


def test_whole_passages_first_then_the_last_one_cut(tokenizer):
    first = ntok(tokenizer, PASSAGES[0])
    kept = fit_passages(tokenizer, PASSAGES, first + 4)
    assert len(kept) == 2
    assert kept[0] == PASSAGES[0]
    assert kept[1] != PASSAGES[1]
    assert PASSAGES[1].startswith(kept[1])
    assert 0 < ntok(tokenizer, kept[1]) <= 4


def test_first_passage_cut_when_it_alone_is_too_long(tokenizer):
    kept = fit_passages(tokenizer, PASSAGES, 7)
    assert len(kept) == 1  # stops after the cut: nothing of the later (shorter) passages
    assert PASSAGES[0].startswith(kept[0])
    assert ntok(tokenizer, kept[0]) <= 7


@pytest.mark.parametrize("budget", range(1, 50, 3))
def test_total_tokens_never_exceed_the_budget(tokenizer, budget: int):
    kept = fit_passages(tokenizer, PASSAGES, budget)
    counts = [ntok(tokenizer, p) for p in kept]
    assert sum(counts) <= budget
    assert kept, "a positive budget keeps at least a cut of the first passage"
    whole = [p for p in kept if p in PASSAGES]
    assert kept[: len(whole)] == list(PASSAGES[: len(whole)])  # whole passages come first, in order
    assert len(kept) - len(whole) <= 1  # at most one cut passage, and it is last
    for original, piece in zip(PASSAGES, kept, strict=False):
        assert original.startswith(piece)


def test_chinese_passages_cut_on_a_character_boundary(tokenizer):
    passages = ["渭河是黄河的最大支流，发源于甘肃。", "黄河流入渤海。"]
    first = ntok(tokenizer, passages[0])
    sep = ntok(tokenizer, "\n")
    kept = fit_passages(tokenizer, passages, first + sep + 4)  # 4 tokens end exactly after "黄河"
    assert kept == [passages[0], "黄河"]
    assert sum(ntok(tokenizer, p) for p in kept) + sep <= first + sep + 4


def test_joined_passage_block_fits_the_budget(tokenizer):
    for budget in (25, 30, 40, 46):
        kept = fit_passages(tokenizer, PASSAGES, budget)
        assert ntok(tokenizer, "\n".join(kept)) <= budget, (budget, kept)


def test_query_is_never_cut(tokenizer):
    query = "Into which lake, after winding through the northern valleys and the old mill towns, " * 4 + "?"
    prompt = render_rag_prompt(tokenizer, DEFAULT_TEMPLATE, query, PASSAGES, 5)
    assert f"Question: {query}\nAnswer:" in prompt
    assert prompt.startswith("Background:\n")
    passages_block = prompt[len("Background:\n") : prompt.index("\n\nQuestion: ")]
    assert ntok(tokenizer, passages_block) <= 5


def test_render_fills_the_template(tokenizer):
    prompt = render_rag_prompt(tokenizer, DEFAULT_TEMPLATE, QUERY, PASSAGES, 10_000)
    assert prompt == "Background:\n" + "\n".join(PASSAGES) + f"\n\nQuestion: {QUERY}\nAnswer:"
    custom = render_rag_prompt(tokenizer, "Q: {query} | C: {passages}", QUERY, PASSAGES[:1], 10_000)
    assert custom == f"Q: {QUERY} | C: {PASSAGES[0]}"


CODE_PASSAGE = 'url = f"/search?q={query}&n={n}"  # formats {query} and {passages} itself'
TEMPLATE_QUERY = "Why does my template print {passages} literally?"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (DEFAULT_TEMPLATE, f"Background:\n{CODE_PASSAGE}\n\nQuestion: {TEMPLATE_QUERY}\nAnswer:"),
        ("Q: {query} | C: {passages}", f"Q: {TEMPLATE_QUERY} | C: {CODE_PASSAGE}"),
    ],
)
def test_placeholders_inside_the_data_stay_as_written(tokenizer, template, expected):
    # one pass over the template: a value is never searched for placeholders (either order of the two)
    assert render_rag_prompt(tokenizer, template, TEMPLATE_QUERY, (CODE_PASSAGE,), 10_000) == expected
    # the path training, eval, generation and the reference pass tokenise prompts by
    cfg = DataConfig(max_seq_len=512, max_passage_tokens=256, prompt_template=template)
    example = tokenize_record(tokenizer, RagRecord(TEMPLATE_QUERY, (CODE_PASSAGE,), "a"), cfg)
    start = example.labels.index(next(label for label in example.labels if label != IGNORE))
    text = tokenizer.decode(example.input_ids[:start], skip_special_tokens=True)
    assert CODE_PASSAGE in text and TEMPLATE_QUERY in text


def test_render_with_chat_template_wraps_a_user_turn(tokenizer):
    prompt = render_rag_prompt(tokenizer, DEFAULT_TEMPLATE, QUERY, PASSAGES, 10_000, chat=True)
    plain = render_rag_prompt(tokenizer, DEFAULT_TEMPLATE, QUERY, PASSAGES, 10_000)
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": plain}], tokenize=False, add_generation_prompt=True
    )
    assert plain in prompt and prompt != plain


# ----------------------------------------------------------------------------------------- tokenize


def test_prompt_tokens_are_masked_and_answer_plus_eos_labelled(tokenizer):
    cfg = DataConfig(max_seq_len=256, max_passage_tokens=64)
    record = RagRecord(QUERY, PASSAGES, "Lake Thuthek")
    example = tokenize_rag(tokenizer, record, cfg)
    prompt = render_rag_prompt(tokenizer, cfg.prompt_template, QUERY, PASSAGES, 64)
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = [*ids(tokenizer, " Lake Thuthek"), tokenizer.eos_token_id]
    assert example.input_ids == prompt_ids + answer_ids
    assert example.labels == [IGNORE] * len(prompt_ids) + answer_ids
    assert example.supervised == len(answer_ids)
    assert tokenizer.decode(labelled(example)) == " Lake Thuthek" + tokenizer.eos_token


def test_answer_whitespace_is_normalised(tokenizer):
    cfg = DataConfig(max_seq_len=256, max_passage_tokens=64)
    a = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "  Lake Thuthek \n"), cfg)
    b = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake Thuthek"), cfg)
    assert a == b


def test_long_answer_is_cut_to_max_seq_len(tokenizer):
    cfg = DataConfig(max_seq_len=64, max_passage_tokens=16)
    answer = "Lake Thuthek, which lies beyond the willows and the mill. " * 10
    example = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, answer), cfg)
    assert len(example.input_ids) == len(example.labels) == 64
    prompt_len = example.labels.index(next(label for label in example.labels if label != IGNORE))
    assert all(label == IGNORE for label in example.labels[:prompt_len])
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert labelled(example) == ids(tokenizer, " " + answer.strip())[: 64 - prompt_len]
    assert example.input_ids[-1] != tokenizer.eos_token_id  # the cut answer has no EOS


def test_prompt_longer_than_max_seq_len_is_an_error(tokenizer):
    cfg = DataConfig(max_seq_len=24, max_passage_tokens=8)
    long_query = "Which of the many lakes in the northern valleys does the river flow into " * 3
    with pytest.raises(ValueError, match="over-long"):
        tokenize_rag(tokenizer, RagRecord(long_query, PASSAGES, "Lake"), cfg)


def test_prompt_that_fills_max_seq_len_exactly_is_an_error(tokenizer):
    cfg = DataConfig(max_seq_len=256, max_passage_tokens=16)
    prompt = render_rag_prompt(tokenizer, cfg.prompt_template, QUERY, PASSAGES, 16)
    n = len(tokenizer(prompt)["input_ids"])
    exact = DataConfig(max_seq_len=n, max_passage_tokens=16)
    with pytest.raises(ValueError, match="over-long"):
        tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake"), exact)
    one_more = DataConfig(max_seq_len=n + 1, max_passage_tokens=16)
    example = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake"), one_more)
    assert example.supervised == 1 and len(example.input_ids) == n + 1


def test_chat_wrapped_rag_prompt_has_one_bos_and_masks_the_template(tokenizer):
    cfg = DataConfig(max_seq_len=256, max_passage_tokens=64, chat_template=True)
    example = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake Thuthek"), cfg)
    assert example.input_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(labelled(example)).strip() == "Lake Thuthek" + tokenizer.eos_token
    first = example.labels.index(labelled(example)[0])
    assert tokenizer.decode(example.input_ids[:first]).endswith("<|assistant|>\n")


def _turn_contents(record: MessagesRecord) -> list[str]:
    return [content for role, content in record.messages if role == "assistant"]


def test_messages_label_only_the_assistant_turn(tokenizer):
    record = MessagesRecord(
        (("system", "Be brief."), ("user", "Where does the Diazei end?"), ("assistant", "In Lake Rorosk."))
    )
    example = tokenize_messages(tokenizer, record, 512)
    full = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in record.messages], tokenize=False
    )
    assert example.input_ids == ids(tokenizer, full)
    (segment,) = segments(example)
    text = tokenizer.decode(segment)
    assert text.startswith("In Lake Rorosk." + tokenizer.eos_token)
    assert text.strip() == "In Lake Rorosk." + tokenizer.eos_token  # at most template whitespace after EOS
    prefix = tokenizer.decode(example.input_ids[: example.labels.index(segment[0])])
    assert prefix.endswith("<|assistant|>\n")
    assert "Be brief." in prefix and "Where does the Diazei end?" in prefix


def test_messages_two_turns_each_assistant_turn_labelled(tokenizer):
    record = MessagesRecord(
        (
            ("user", "Hi"),
            ("assistant", "Hello there."),
            ("user", "Where does the river 渭河 end?"),
            ("assistant", "It flows into 黄河."),
        )
    )
    example = tokenize_messages(tokenizer, record, 512)
    parts = [tokenizer.decode(s) for s in segments(example)]
    assert len(parts) == 2
    for part, content in zip(parts, _turn_contents(record), strict=True):
        assert part.strip() == content + tokenizer.eos_token
    masked = tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == IGNORE]
    )
    assert "Hi" in masked and "渭河" in masked
    assert "Hello there." not in masked and "黄河." not in masked
    assert "<|assistant|>" in masked and "<|assistant|>" not in "".join(parts)


def test_messages_labels_are_exactly_content_plus_eos(tokenizer):
    record = MessagesRecord(
        (("user", "Hi"), ("assistant", "Hello there."), ("user", "Bye"), ("assistant", "Bye!"))
    )
    example = tokenize_messages(tokenizer, record, 512)
    parts = [tokenizer.decode(s) for s in segments(example)]
    assert parts == [c + tokenizer.eos_token for c in _turn_contents(record)]


def test_messages_truncated_to_max_seq_len(tokenizer):
    record = MessagesRecord((("user", "Hi"), ("assistant", "Hello there, " * 20)))
    full = tokenize_messages(tokenizer, record, 512)
    cut = tokenize_messages(tokenizer, record, 16)
    assert len(cut.input_ids) == len(cut.labels) == 16
    assert cut.input_ids == full.input_ids[:16] and cut.labels == full.labels[:16]
    assert cut.supervised > 0


def test_messages_without_assistant_tokens_in_the_window_is_an_error(tokenizer):
    record = MessagesRecord((("user", "A long question " * 30), ("assistant", "Short.")))
    with pytest.raises(ValueError, match="over-long"):
        tokenize_messages(tokenizer, record, 32)


def test_tokenize_record_dispatches(tokenizer):
    cfg = DataConfig(max_seq_len=256, max_passage_tokens=64)
    rag = RagRecord(QUERY, PASSAGES, "Lake")
    msgs = MessagesRecord((("user", "Hi"), ("assistant", "Hello")))
    assert tokenize_record(tokenizer, rag, cfg) == tokenize_rag(tokenizer, rag, cfg)
    assert tokenize_record(tokenizer, msgs, cfg) == tokenize_messages(tokenizer, msgs, 256)


# ------------------------------------------------------------------------------------------ collate


def test_collate_pads_right_with_no_loss_on_padding(tokenizer):
    pad = tokenizer.pad_token_id
    examples = [
        Example([10, 11, 12, 13, 14], [IGNORE, IGNORE, 12, 13, 14]),
        Example([20, 21], [IGNORE, 21]),
        Example([30, 31, 32], [IGNORE, IGNORE, IGNORE]),
    ]
    batch = collate(examples, pad_id=pad)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 13, 14],
        [20, 21, pad, pad, pad],
        [30, 31, 32, pad, pad],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE, IGNORE, 12, 13, 14],
        [IGNORE, 21, IGNORE, IGNORE, IGNORE],
        [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE],
    ]


def test_collate_rounds_length_up(tokenizer):
    batch = collate([Example([1, 2, 3], [1, 2, 3])], pad_id=tokenizer.pad_token_id, multiple_of=8)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["attention_mask"].sum().item() == 3
    assert (batch["labels"][0, 3:] == IGNORE).all()
    assert (batch["input_ids"][0, 3:] == tokenizer.pad_token_id).all()


def test_collate_of_real_examples(tokenizer):
    cfg = DataConfig(max_seq_len=256, max_passage_tokens=64)
    examples = [
        tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake Thuthek"), cfg),
        tokenize_rag(tokenizer, RagRecord("Where?", (), "Here"), cfg),
    ]
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids
        assert batch["labels"][row, :n].tolist() == example.labels
        assert batch["attention_mask"][row].sum().item() == n
    assert (batch["labels"] != IGNORE).sum().item() == sum(e.supervised for e in examples)
