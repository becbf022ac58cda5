#!/usr/bin/env python
"""Deterministically regenerate the committed demo assets under ``dstrain/assets``.

Run from the repository root::

    .venv/bin/python scripts/make_assets.py

Produces

* ``dstrain/assets/data/*.jsonl`` -- a synthetic retrieval-grounded QA task about invented entities
  (invented names built from syllables, so answers can only be read from the passages);
* ``dstrain/assets/tiny/`` -- a byte-level BPE fast tokenizer (vocab 2048) trained on that data, with a chat
  template, plus a tiny Llama ``config.json`` (no weights: the package random-initialises them).

Everything is driven by a single ``random.Random(SEED)``; sets are only used for membership tests (never
iterated) so the output does not depend on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 1873
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "dstrain" / "assets" / "data"
TINY_DIR = REPO_ROOT / "dstrain" / "assets" / "tiny"

N_SFT_TRAIN = 1200
N_SFT_EVAL = 200
N_PREF_TRAIN = 1200
N_PREF_EVAL = 200
N_MESSAGES_TRAIN = 300
ZH_PROB = 0.03  # fraction of (train-only) records rendered in Chinese
PLAIN_PREF_PROB = 0.2  # fraction of train preference records with plain-string chosen/rejected
SECOND_TURN_PROB = 0.3  # fraction of messages records with a second user/assistant turn
DESCRIPTOR_PROB = 0.5  # chance a passage carries an extra (answer-free) sentence about its subject
MIN_PASSAGES, MAX_PASSAGES = 3, 5

VOCAB_SIZE = 2048
BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, in this order
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]  # ids 4..6
MAX_DATA_BYTES = 2_500_000

# Each turn renders as "<|role|>\n{content}</s>\n"; the whole conversation is preceded by the BOS token.
# The tokenizer has NO post-processor, so tokenizer(text) never inserts BOS/EOS itself: BOS comes only from
# this template (or from whoever builds the sequence).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer the question using only the background passages.",
    "Answer briefly, using only the information in the background.",
    "Read the background passages and reply with just the answer.",
)

# ---------------------------------------------------------------------------------------------------------
# Invented names
# ---------------------------------------------------------------------------------------------------------

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "sh", "st")
ONSETS += ("t", "th", "v", "z", "y", "c", "qu", "")
NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou", "ia")
CODAS = ("", "", "n", "r", "l", "s", "sk", "th", "m", "x", "nd", "rn", "sh", "k")


class NameGenerator:
    """Produces globally unique invented names, so train and eval worlds never share an entity."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _candidate(self, n_syllables: int) -> str:
        parts = []
        for i in range(n_syllables):
            onset = self.rng.choice(ONSETS) if i == 0 else self.rng.choice(ONSETS[:-1])
            coda = self.rng.choice(CODAS) if i == n_syllables - 1 else ""
            parts.append(onset + self.rng.choice(NUCLEI) + coda)
        return "".join(parts).capitalize()

    def new(self, min_syllables: int = 2, max_syllables: int = 3) -> str:
        while True:
            name = self._candidate(self.rng.randint(min_syllables, max_syllables))
            if 4 <= len(name) <= 11 and name.lower() not in self.used:
                self.used.add(name.lower())
                return name

    def person(self) -> str:
        return f"{self.new(2, 2)} {self.new(2, 2)}"


# ---------------------------------------------------------------------------------------------------------
# Relations and world facts
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """A relation template in English and Chinese; ``{s}`` is the subject, ``{o}`` the object."""

    name: str
    kind: str  # entity kind of the subject (selects its descriptor sentences)
    fact_en: str
    questions_en: tuple[str, ...]
    answer_en: str
    fact_zh: str
    question_zh: str
    answer_zh: str


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "capital",
        "country",
        "The capital of {s} is {o}.",
        ("What is the capital of {s}?", "Which city is the capital of {s}?"),
        "{o}",
        "{s}的首都是{o}。",
        "{s}的首都是哪座城市？",
        "{o}",
    ),
    Relation(
        "language",
        "country",
        "The people of {s} speak {o}.",
        ("What language do the people of {s} speak?", "Which language is spoken in {s}?"),
        "{o}",
        "{s}的人民讲{o}。",
        "{s}的人民讲什么语言？",
        "{o}",
    ),
    Relation(
        "export",
        "country",
        "The main export of {s} is {o}.",
        ("What is the main export of {s}?", "What does {s} mainly export?"),
        "{o}",
        "{s}的主要出口商品是{o}。",
        "{s}的主要出口商品是什么？",
        "{o}",
    ),
    Relation(
        "birth_year",
        "person",
        "{s} was born in {o}.",
        ("In which year was {s} born?", "When was {s} born?"),
        "{o}",
        "{s}生于{o}年。",
        "{s}是哪一年出生的？",
        "{o}",
    ),
    Relation(
        "river_mouth",
        "river",
        "The river {s} flows into Lake {o}.",
        ("Into which lake does the river {s} flow?", "Where does the river {s} end?"),
        "Lake {o}",
        "{s}河最终流入{o}湖。",
        "{s}河流入哪个湖？",
        "{o}湖",
    ),
    Relation(
        "founder",
        "town",
        "The town of {s} was founded by {o}.",
        ("Who founded the town of {s}?", "Who was the founder of {s}?"),
        "{o}",
        "{s}镇由{o}创建。",
        "谁创建了{s}镇？",
        "{o}",
    ),
    Relation(
        "height",
        "mountain",
        "Mount {s} rises {o} metres above the sea.",
        ("How high is Mount {s}?", "What is the height of Mount {s}?"),
        "{o} metres",
        "{s}山海拔{o}米。",
        "{s}山海拔多少米？",
        "{o}米",
    ),
    Relation(
        "captain",
        "ship",
        "The ship {s} is commanded by Captain {o}.",
        ("Who commands the ship {s}?", "Who is the captain of the ship {s}?"),
        "{o}",
        "{s}号船由{o}船长指挥。",
        "谁是{s}号船的船长？",
        "{o}",
    ),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}

COMMODITIES = {
    "amber": "琥珀",
    "copper": "铜",
    "saffron": "藏红花",
    "salt": "盐",
    "indigo": "靛蓝",
    "cork": "软木",
    "tin": "锡",
    "wool": "羊毛",
    "silk": "丝绸",
    "timber": "木材",
    "cinnamon": "肉桂",
    "marble": "大理石",
    "pearls": "珍珠",
    "honey": "蜂蜜",
    "glassware": "玻璃器皿",
    "dried fish": "鱼干",
    "silver": "银",
    "olive oil": "橄榄油",
    "pepper": "胡椒",
    "linen": "亚麻布",
    "iron ore": "铁矿石",
    "tea": "茶叶",
    "rice": "大米",
    "horses": "马匹",
    "paper": "纸张",
    "jade": "玉石",
    "barley": "大麦",
    "wine": "葡萄酒",
    "porcelain": "瓷器",
    "leather": "皮革",
}
TITLES = ("Dr. ", "Professor ", "Lady ", "Sir ", "Master ", "", "")
LANGUAGE_SUFFIXES = ("ic", "ish", "ese", "i", "an")

DESCRIPTORS: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "country": (
        "{s} is a {0} {1} {2}.",
        (
            ("small", "large", "mountainous", "coastal", "landlocked", "wealthy", "sparsely populated"),
            ("kingdom", "republic", "principality", "federation", "duchy", "island nation"),
            ("in the eastern hills", "on the southern sea", "beyond the salt marshes", "north of the desert"),
        ),
    ),
    "person": (
        "{s} was a {0} {1}.",
        (
            ("noted", "celebrated", "little-known", "self-taught", "famous"),
            ("astronomer", "cartographer", "physician", "botanist", "engineer", "poet", "mathematician"),
        ),
    ),
    "river": (
        "The {s} is a {0} river {1}.",
        (
            ("slow", "swift", "muddy", "shallow", "winding", "cold"),
            (
                "lined with willows",
                "crossed by many old bridges",
                "popular with fishermen",
                "prone to floods",
            ),
        ),
    ),
    "town": (
        "{s} is a {0} town known for its {1}.",
        (
            ("quiet", "busy", "walled", "hillside", "harbour"),
            ("clock tower", "spring fair", "stone bridges", "weavers", "bakeries", "old library"),
        ),
    ),
    "mountain": (
        "Mount {s} is often {0}.",
        (
            (
                "covered in snow",
                "hidden by clouds",
                "climbed in summer",
                "struck by storms",
                "visited by pilgrims",
            ),
        ),
    ),
    "ship": (
        "The {s} is a {0} {1}.",
        (
            ("fast", "heavy", "old", "newly built", "three-masted"),
            ("merchant ship", "whaler", "survey vessel", "river barge", "schooner"),
        ),
    ),
}

# entities per kind in each world (countries carry three relations each)
TRAIN_WORLD_SIZES = {"country": 60, "person": 80, "river": 80, "town": 80, "mountain": 80, "ship": 80}
EVAL_WORLD_SIZES = {"country": 15, "person": 20, "river": 20, "town": 20, "mountain": 20, "ship": 20}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    obj_en: str
    obj_zh: str
    descriptor: str  # an answer-free English sentence about the subject

    @property
    def rel(self) -> Relation:
        return RELATION_BY_NAME[self.relation]

    def sentence(self, lang: str) -> str:
        if lang == "zh":
            return self.rel.fact_zh.format(s=self.subject, o=self.obj_zh)
        return self.rel.fact_en.format(s=self.subject, o=self.obj_en)

    def answer(self, lang: str) -> str:
        if lang == "zh":
            return self.rel.answer_zh.format(o=self.obj_zh)
        return self.rel.answer_en.format(o=self.obj_en)

    def question(self, rng: random.Random, lang: str) -> str:
        if lang == "zh":
            return self.rel.question_zh.format(s=self.subject)
        return rng.choice(self.rel.questions_en).format(s=self.subject)


def make_descriptor(rng: random.Random, kind: str, subject: str) -> str:
    template, slots = DESCRIPTORS[kind]
    sentence = template.format(*(rng.choice(options) for options in slots), s=subject)
    return re.sub(r"\ba ([aeiou])", r"an \1", sentence)  # "a old schooner" -> "an old schooner"


def make_subject(rng: random.Random, names: NameGenerator, kind: str) -> str:
    if kind == "person":
        return rng.choice(TITLES) + names.person()
    return names.new()


def make_object(rng: random.Random, names: NameGenerator, relation: str) -> tuple[str, str]:
    """Return the (English, Chinese) object of a fact."""
    if relation == "language":
        obj = names.new(1, 2) + rng.choice(LANGUAGE_SUFFIXES)
        return obj, obj
    if relation == "export":
        commodity = rng.choice(list(COMMODITIES))
        return commodity, COMMODITIES[commodity]
    if relation == "birth_year":
        year = str(rng.randint(1450, 1990))
        return year, year
    if relation == "height":
        height = str(rng.randint(600, 8800))
        return height, height
    if relation == "founder":
        person = rng.choice(TITLES) + names.person()
        return person, person
    if relation == "captain":
        person = names.person()
        return person, person
    obj = names.new()
    return obj, obj


def build_world(rng: random.Random, names: NameGenerator, sizes: dict[str, int]) -> list[Fact]:
    facts: list[Fact] = []
    for kind, count in sizes.items():
        relations = [r for r in RELATIONS if r.kind == kind]
        for _ in range(count):
            subject = make_subject(rng, names, kind)
            descriptor = make_descriptor(rng, kind, subject)
            for rel in relations:
                obj_en, obj_zh = make_object(rng, names, rel.name)
                facts.append(Fact(rel.name, subject, obj_en, obj_zh, descriptor))
    return facts


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One retrieval-grounded question: the target fact plus its shuffled passages."""

    lang: str
    target: Fact
    query: str
    passages: list[str]
    distractors: list[Fact]

    @property
    def answer(self) -> str:
        return self.target.answer(self.lang)


def contains_answer(text: str, answer: str, lang: str) -> bool:
    if lang == "zh":  # \b is meaningless between CJK characters
        return answer in text
    return re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", text) is not None


def render_passage(rng: random.Random, fact: Fact, lang: str) -> str:
    sentence = fact.sentence(lang)
    if lang == "zh" or rng.random() >= DESCRIPTOR_PROB:
        return sentence
    if rng.random() < 0.5:
        return f"{fact.descriptor} {sentence}"
    return f"{sentence} {fact.descriptor}"


def pick_distractors(rng: random.Random, facts: list[Fact], target: Fact, lang: str, n: int) -> list[Fact]:
    """1-2 facts of the same relation about other entities (hard negatives), the rest from anywhere."""
    answer = target.answer(lang)

    def usable(f: Fact) -> bool:
        return f != target and not contains_answer(f.sentence(lang) + " " + f.descriptor, answer, lang)

    same = [f for f in facts if f.relation == target.relation and f.subject != target.subject and usable(f)]
    n_same = rng.randint(1, min(2, n))
    chosen = rng.sample(same, n_same)
    others = [f for f in facts if usable(f) and f not in chosen]
    chosen += rng.sample(others, n - n_same)
    return chosen


def make_example(rng: random.Random, facts: list[Fact], allow_zh: bool) -> Example:
    lang = "zh" if allow_zh and rng.random() < ZH_PROB else "en"
    target = rng.choice(facts)
    n_passages = rng.randint(MIN_PASSAGES, MAX_PASSAGES)
    distractors = pick_distractors(rng, facts, target, lang, n_passages - 1)
    passages = [render_passage(rng, f, lang) for f in distractors]
    passages.insert(rng.randint(0, len(passages)), render_passage(rng, target, lang))
    answer = target.answer(lang)
    assert sum(contains_answer(p, answer, lang) for p in passages) == 1, (answer, passages)
    return Example(lang, target, target.question(rng, lang), passages, distractors)


def sft_record(ex: Example) -> dict[str, Any]:
    return {"query": ex.query, "retrieval_result": ex.passages, "answer": ex.answer}


def preference_record(rng: random.Random, ex: Example, allow_plain: bool) -> dict[str, Any]:
    wrong = [f for f in ex.distractors if f.relation == ex.target.relation]
    rejected = rng.choice(wrong).answer(ex.lang)
    assert rejected != ex.answer
    if allow_plain and rng.random() < PLAIN_PREF_PROB:
        chosen_field: Any = ex.answer
        rejected_field: Any = rejected
    else:
        chosen_field, rejected_field = {"text": ex.answer}, {"text": rejected}
    return {
        "query": ex.query,
        "retrieval_result": ex.passages,
        "chosen": chosen_field,
        "rejected": rejected_field,
    }


def rag_prompt(passages: list[str], query: str) -> str:
    return "Background:\n" + "\n".join(passages) + "\n\nQuestion: " + query


def messages_record(rng: random.Random, ex: Example) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": rag_prompt(ex.passages, ex.query)},
        {"role": "assistant", "content": ex.answer},
    ]
    if rng.random() < SECOND_TURN_PROB:
        follow_up = rng.choice(ex.distractors)
        messages.append({"role": "user", "content": "Question: " + follow_up.question(rng, ex.lang)})
        messages.append({"role": "assistant", "content": follow_up.answer(ex.lang)})
    return {"messages": messages}


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path.stat().st_size


def generate_data(rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    names = NameGenerator(rng)
    train_world = build_world(rng, names, TRAIN_WORLD_SIZES)
    eval_world = build_world(rng, names, EVAL_WORLD_SIZES)  # disjoint: names are globally unique
    train_subjects = {f.subject for f in train_world}
    assert not any(f.subject in train_subjects for f in eval_world)

    def examples(world: list[Fact], n: int, allow_zh: bool) -> Iterator[Example]:
        for _ in range(n):
            yield make_example(rng, world, allow_zh)

    return {
        "sft_rag_train.jsonl": [sft_record(ex) for ex in examples(train_world, N_SFT_TRAIN, True)],
        "sft_rag_eval.jsonl": [sft_record(ex) for ex in examples(eval_world, N_SFT_EVAL, False)],
        "preference_train.jsonl": [
            preference_record(rng, ex, allow_plain=True) for ex in examples(train_world, N_PREF_TRAIN, True)
        ],
        "preference_eval.jsonl": [
            preference_record(rng, ex, allow_plain=False) for ex in examples(eval_world, N_PREF_EVAL, False)
        ],
        "messages_train.jsonl": [
            messages_record(rng, ex) for ex in examples(train_world, N_MESSAGES_TRAIN, True)
        ],
    }


def iter_texts(obj: Any) -> Iterator[str]:
    """All string leaves of a (nested) record, except dict keys."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_texts(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from iter_texts(value)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and config
# ---------------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str]) -> Any:
    """Byte-level BPE; no post-processor (BOS/EOS are never inserted automatically)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=BASE_SPECIAL_TOKENS + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte -> any UTF-8 text round-trips
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Any, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=ROLE_TOKENS,
        model_max_length=1024,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))


def save_config(out_dir: Path, vocab_size: int) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=BASE_SPECIAL_TOKENS.index("<s>"),
        eos_token_id=BASE_SPECIAL_TOKENS.index("</s>"),
        pad_token_id=BASE_SPECIAL_TOKENS.index("<pad>"),
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    config.save_pretrained(str(out_dir))


# ---------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_special_ids(tokenizer: Any) -> None:
    for i, token in enumerate(BASE_SPECIAL_TOKENS + ROLE_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == i, token
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert encode(tokenizer, "hello") == tokenizer("hello")["input_ids"], "unexpected post-processor"


def check_round_trip(tokenizer: Any, texts: list[str]) -> None:
    for text in texts:
        decoded = tokenizer.decode(encode(tokenizer, text), clean_up_tokenization_spaces=False)
        assert decoded == text, (text, decoded)


def check_chat_prefixes(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> None:
    """Rendering messages[:k] (plus a generation prompt before an assistant turn) token-prefixes [:k+1]."""

    def ids(messages: list[dict[str, str]], gen: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        return encode(tokenizer, text)

    for messages in conversations:
        for k in range(1, len(messages)):
            longer = ids(messages[: k + 1], False)
            assert longer[: len(ids(messages[:k], False))] == ids(messages[:k], False), messages[: k + 1]
            if messages[k]["role"] == "assistant":
                prompt = ids(messages[:k], True)
                assert longer[: len(prompt)] == prompt, messages[: k + 1]


def check_sft_lengths(tokenizer: Any, records: list[dict[str, Any]]) -> None:
    """Token counts of the plain-text SFT format; also check the prompt is a token-prefix of prompt+answer."""
    lengths = []
    for rec in records:
        prompt = rag_prompt(rec["retrieval_result"], rec["query"]) + "\nAnswer:"
        full_ids = encode(tokenizer, prompt + " " + rec["answer"])
        prompt_ids = encode(tokenizer, prompt)
        assert full_ids[: len(prompt_ids)] == prompt_ids, rec
        lengths.append(len(full_ids))
    print(f"sft_rag_train tokens/record: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}")


def check_model(out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(str(out_dir))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    batch = torch.randint(7, config.vocab_size, (4, 256))
    timings = []
    for _ in range(4):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        timings.append(time.perf_counter() - start)
    best = min(timings[1:])
    print(f"tiny llama: {n_params / 1e6:.2f}M params, fwd+bwd 4x256 on 1 thread: {best * 1000:.1f} ms")


def verify(data: dict[str, list[dict[str, Any]]]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_DIR))
    check_special_ids(tokenizer)
    assert len(tokenizer) == AutoConfig.from_pretrained(str(TINY_DIR)).vocab_size
    texts = [t for records in data.values() for rec in records for t in iter_texts(rec)]
    check_round_trip(tokenizer, [t for t in texts if re.search(r"[\u4e00-\u9fff]", t)])
    check_round_trip(tokenizer, texts[:: max(1, len(texts) // 500)])
    check_chat_prefixes(tokenizer, [rec["messages"] for rec in data["messages_train.jsonl"]])
    check_sft_lengths(tokenizer, data["sft_rag_train.jsonl"])
    check_model(TINY_DIR)


def main() -> None:
    rng = random.Random(SEED)
    data = generate_data(rng)
    total = 0
    for filename, records in data.items():
        size = write_jsonl(DATA_DIR / filename, records)
        total += size
        print(f"{filename}: {len(records)} records, {size / 1024:.0f} KiB")
    assert total < MAX_DATA_BYTES, total
    texts = [t for records in data.values() for rec in records for t in iter_texts(rec)]
    tok = train_tokenizer(texts)
    TINY_DIR.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, TINY_DIR)
    save_config(TINY_DIR, vocab_size=tok.get_vocab_size())
    print(f"tokenizer vocab: {tok.get_vocab_size()}, saved to {TINY_DIR.relative_to(REPO_ROOT)}")
    verify(data)


if __name__ == "__main__":
    main()
