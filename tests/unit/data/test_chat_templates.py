"""data.chat_template with each family's real chat template (tests/fixtures/chat_templates), on the bundled
tokenizer given the family's special tokens: the prompt is exactly what the family's template renders with
its generation prompt, the labels are exactly the answer plus the template's end-of-turn token, one BOS."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstrain.config.run import DataConfig, ModelConfig
from dstrain.data import prompts
from dstrain.data.batches import IGNORE, rag_tokens, tokenize_messages, tokenize_rag
from dstrain.data.prompts import render_rag_prompt, stop_token_ids
from dstrain.data.records import MessagesRecord, RagRecord
from dstrain.model.build import load_tokenizer

TEMPLATES = Path(__file__).parents[2] / "fixtures" / "chat_templates"
# family -> (its special tokens, the end-of-turn text an answer is labelled through)
FAMILIES = {
    "llama3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "qwen2_5": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "gemma2": (["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "gemma3": (["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "minicpm3": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "phi3": (["<|end|>"], "<|end|>"),
    "mistral_nemo": (["[INST]", "[/INST]"], "</s>"),  # Mistral ends an answer with EOS itself
}
PASSAGES = ("The river Quodalam flows into Lake Thuthek.", "The river Tafadresh flows into Lake Saehan.")
QUERY = "Into which lake does the river Quodalam flow?"
CFG = DataConfig(max_seq_len=256, max_passage_tokens=64, chat_template=True)


def family_tokenizer(family: str):
    """The bundled tokenizer carrying `family`'s template, its special tokens single tokens as in the family."""
    tokenizer = load_tokenizer(ModelConfig())
    tokenizer.add_tokens(FAMILIES[family][0], special_tokens=True)
    tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user_turn(tokenizer) -> list[dict]:
    text = render_rag_prompt(tokenizer, CFG.prompt_template, QUERY, PASSAGES, CFG.max_passage_tokens)
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_prompt_is_the_familys_generation_prompt_and_labels_end_at_its_end_of_turn(family):
    tokenizer = family_tokenizer(family)
    end_of_turn = FAMILIES[family][1]
    example = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake Thuthek"), CFG)
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    expected_prompt = tokenizer.apply_chat_template(
        user_turn(tokenizer), tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(example.input_ids[:start]) == expected_prompt
    assert example.input_ids[:start] == ids(tokenizer, expected_prompt)
    assert all(label == IGNORE for label in example.labels[:start])
    assert example.labels[start:] == example.input_ids[start:]
    assert tokenizer.decode(example.labels[start:]) == "Lake Thuthek" + end_of_turn
    assert example.labels[-1] == tokenizer.convert_tokens_to_ids(end_of_turn)
    # The whole row is the family's own rendering of the conversation, up to the end-of-turn token.
    full = tokenizer.apply_chat_template(
        [*user_turn(tokenizer), {"role": "assistant", "content": "Lake Thuthek"}], tokenize=False
    )
    assert ids(tokenizer, full)[: len(example.input_ids)] == example.input_ids
    rest = tokenizer.decode(ids(tokenizer, full)[len(example.input_ids) :])
    assert rest.strip() in ("", tokenizer.eos_token)  # template whitespace (Phi-3: and EOS) is not labelled


@pytest.mark.parametrize("family", FAMILIES)
def test_one_bos_at_most(family):
    tokenizer = family_tokenizer(family)
    example = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake Thuthek"), CFG)
    template_bos = "bos_token" in tokenizer.chat_template
    assert example.input_ids.count(tokenizer.bos_token_id) == int(template_bos)
    if template_bos:
        assert example.input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_preference_pair_shares_the_prompt_and_labels_each_answer_through_end_of_turn(family):
    tokenizer = family_tokenizer(family)
    end_of_turn = FAMILIES[family][1]
    record = RagRecord(QUERY, PASSAGES, "Lake Thuthek", rejected="Lake Saehan, far to the north")
    prompt, (chosen, rejected) = rag_tokens(tokenizer, record, CFG, record.answer, record.rejected)
    assert prompt == tokenize_rag(tokenizer, record, CFG).input_ids[: len(prompt)]
    assert chosen == tokenize_rag(tokenizer, record, CFG).input_ids[len(prompt) :]
    assert tokenizer.decode(chosen) == "Lake Thuthek" + end_of_turn
    assert tokenizer.decode(rejected) == "Lake Saehan, far to the north" + end_of_turn
    full = tokenizer.apply_chat_template(
        [*user_turn(tokenizer), {"role": "assistant", "content": record.rejected}], tokenize=False
    )
    assert ids(tokenizer, full)[: len(prompt) + len(rejected)] == prompt + rejected


def test_a_template_that_ends_a_turn_with_plain_text_gets_eos():
    tokenizer = load_tokenizer(ModelConfig())
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    example = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake Thuthek"), CFG)
    answer = [label for label in example.labels if label != IGNORE]
    assert tokenizer.decode(answer) == "Lake Thuthek" + tokenizer.eos_token


def test_the_bundled_template_labels_the_answer_as_its_template_renders_it(tokenizer):
    """The bundled tiny template: prompt unchanged; the answer follows "<|assistant|>\\n" with no space."""
    example = tokenize_rag(tokenizer, RagRecord(QUERY, PASSAGES, "Lake Thuthek"), CFG)
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    expected_prompt = tokenizer.apply_chat_template(
        user_turn(tokenizer), tokenize=False, add_generation_prompt=True
    )
    assert example.input_ids[:start] == ids(tokenizer, expected_prompt)
    assert example.labels[start:] == [*ids(tokenizer, "Lake Thuthek"), tokenizer.eos_token_id]


# ------------------------------------------------------------------------------- system role, alternation

SYSTEM_CHAT = MessagesRecord(
    (
        ("system", "Answer in one line."),
        ("user", "Where does the Diazei end?"),
        ("assistant", "In Lake Rorosk."),
    )
)


def test_gemma2_folds_the_system_message_into_the_first_user_turn_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(prompts, "_said", set())
    tokenizer = family_tokenizer("gemma2")
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in SYSTEM_CHAT.messages], tokenize=False
        )
    example = tokenize_messages(tokenizer, SYSTEM_CHAT, 512)
    tokenize_messages(tokenizer, SYSTEM_CHAT, 512)
    folded = [
        {"role": "user", "content": "Answer in one line.\n\nWhere does the Diazei end?"},
        {"role": "assistant", "content": "In Lake Rorosk."},
    ]
    assert example.input_ids == ids(tokenizer, tokenizer.apply_chat_template(folded, tokenize=False))
    answer = [label for label in example.labels if label != IGNORE]
    assert tokenizer.decode(answer) == "In Lake Rorosk.<end_of_turn>"
    start = example.labels.index(answer[0])
    prompt = tokenizer.apply_chat_template(folded[:1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example.input_ids[:start]) == prompt
    assert (
        capsys.readouterr().err.count("no system role: system messages are folded into the first user turn")
        == 1
    )


@pytest.mark.parametrize("family", ["gemma3", "llama3", "qwen2_5", "minicpm3", "phi3"])
def test_templates_that_take_a_system_message_render_it_their_own_way(family, monkeypatch, capsys):
    monkeypatch.setattr(prompts, "_said", set())
    tokenizer = family_tokenizer(family)
    messages = [{"role": r, "content": c} for r, c in SYSTEM_CHAT.messages]
    example = tokenize_messages(tokenizer, SYSTEM_CHAT, 512)
    full = ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    assert example.input_ids == full
    answer = [label for label in example.labels if label != IGNORE]
    assert tokenizer.decode(answer) == "In Lake Rorosk." + FAMILIES[family][1]
    assert "folded" not in capsys.readouterr().err


def test_strict_alternation_merges_consecutive_turns_of_one_role():
    tokenizer = family_tokenizer("gemma2")
    record = MessagesRecord(
        (
            ("user", "Passage: the Diazei ends in Lake Rorosk."),
            ("user", "Where does it end?"),
            ("assistant", "Rorosk."),
        )
    )
    example = tokenize_messages(tokenizer, record, 512)
    merged = [
        {"role": "user", "content": "Passage: the Diazei ends in Lake Rorosk.\n\nWhere does it end?"},
        {"role": "assistant", "content": "Rorosk."},
    ]
    assert example.input_ids == ids(tokenizer, tokenizer.apply_chat_template(merged, tokenize=False))


def test_a_conversation_the_template_cannot_take_is_a_bad_record():
    tokenizer = family_tokenizer("gemma2")
    record = MessagesRecord((("assistant", "Hello."), ("user", "Hi"), ("assistant", "Rorosk.")))
    with pytest.raises(ValueError, match=r"chat template refused this conversation.*alternate"):
        tokenize_messages(tokenizer, record, 512)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_at_the_end_of_turn_token(family):
    tokenizer = family_tokenizer(family)
    stops = stop_token_ids(tokenizer)
    assert stops[0] == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids(FAMILIES[family][1]) in stops
