#!/usr/bin/env python
"""Pretrain the bundled tiny Llama and ship its weights as ``dstrain/assets/tiny/model.safetensors`` (bf16).

Run from the repository root (about 5 minutes on 2 otherwise idle CPU cores)::

    .venv/bin/python scripts/pretrain_tiny.py

Training has two phases with one AdamW optimiser: a short induction warm-up on random token strings written
twice (without it the 2-layer model sits on a long plateau where it cannot copy from its context, so it could
never read an answer out of the passages), then the corpus.

The corpus is synthetic text from the generator in ``scripts/make_assets.py``, driven by a different seed and
with every invented name kept disjoint from the shipped data files, so the demo's QA records never appear in
it. It mixes passage groups (fact sentences plus answer-free filler sentences), documents in the RAG prompt
shape (``Background: ... Question: ... Answer: ...``), lists of names written twice, chat-template
conversations and a little Chinese. The model sees the format, but a LoRA SFT on the demo data still has
something to learn.

Only ``model.safetensors`` is written into the asset directory; ``config.json``, the tokenizer and the chat
template are left untouched (``save_pretrained`` writes to a scratch directory first).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_assets as ma

SEED = 90210  # must differ from make_assets.SEED
TORCH_SEED = 0
N_THREADS = 2

N_DOCS = 36_000
DOCS_PER_WORLD = 120  # a fresh small world every so often: many entities, so facts are read, not memorised
WORLD_SIZES = ma.EVAL_WORLD_SIZES
# (kind, probability). No document in the demo's "Background/Question/Answer:" shape: the base knows the
# language of passages and chat answers, so the bundled SFT demo has the RAG answer format left to learn
# (a clearly falling loss). "reading" documents (passages, then questions answered from them) and repeated
# strings in every step (random tokens and corpus snippets) keep copying from context alive through the
# corpus phase: without them the induction heads of the warm-up fade, and LoRA r=16 alone cannot build a copy
# circuit (its rank is far below the ~170 distinct answers of the learning check, dstrain/data/synthetic.py).
DOC_MIX = (
    ("passages", 0.30),
    ("entity", 0.20),
    ("repeat", 0.10),
    ("rag", 0.0),
    ("reading", 0.15),
    ("chat", 0.20),
    ("zh_passages", 0.05),
    ("zh_rag", 0.0),
)
MIN_DOC_PASSAGES, MAX_DOC_PASSAGES = 3, 8
REPEAT_FRAMES = (
    ("Names in this record:", "Again:"),
    ("Index:", "The same, in order:"),
    ("Mentioned here:", "Repeated:"),
)

# Phase 1, induction warm-up: random token strings written twice. A 2-layer model on the corpus alone sits on
# a long plateau before it learns to copy from its context; this short task gets it past it cheaply.
INDUCTION_STEPS = 600
INDUCTION_BATCH = 64
INDUCTION_HALF = 24  # tokens per half
INDUCTION_LR = 3e-3
INDUCTION_WARMUP = 20
# repeated strings in every corpus step: random tokens, and corpus snippets
AUX_RANDOM_BATCH = 8
AUX_CORPUS_BATCH = 8
FIRST_TEXT_ID = len(ma.BASE_SPECIAL_TOKENS) + len(ma.ROLE_TOKENS)

# Phase 2, the corpus
SEQ_LEN = 256
MIN_ROOM = 24  # a row with less room than this is closed
MAX_OPEN_ROWS = 64
BATCH_SIZE = 16
STEPS = 900
PEAK_LR = 3e-3
MIN_LR_RATIO = 0.1
WARMUP_STEPS = 60
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
LOG_EVERY = 50

IGNORE = -100
N_EVAL_RECORDS = 200
N_DECODE = 5
EVAL_FILE = ma.DATA_DIR / "sft_rag_eval.jsonl"


# ---------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------


def shipped_words() -> set[str]:
    """Every (lower-cased) Latin word in the shipped data files; generated names must avoid all of them."""
    words: set[str] = set()
    for path in sorted(ma.DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            for text in ma.iter_texts(json.loads(line)):
                words.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    return words


def fact_names(fact: ma.Fact) -> list[str]:
    """The invented words of a fact: its subject and (for name-valued relations) its object."""
    names = fact.subject.split()
    if fact.relation not in ("export", "birth_year", "height"):
        names += fact.obj_en.split()
    return [n for n in names if n.rstrip(".") not in ("Dr", "Professor", "Lady", "Sir", "Master")]


def fresh_world(rng: random.Random, names: ma.NameGenerator, banned: set[str]) -> list[ma.Fact]:
    """A world whose facts share no name with the shipped data (a derived language name can still collide)."""
    world = ma.build_world(rng, names, WORLD_SIZES)
    return [f for f in world if not any(n.lower() in banned for n in fact_names(f))]


def make_example(rng: random.Random, facts: list[ma.Fact], lang: str) -> ma.Example:
    """Like ``make_assets.make_example`` but with the language chosen by the caller."""
    target = rng.choice(facts)
    n_passages = rng.randint(ma.MIN_PASSAGES, ma.MAX_PASSAGES)
    distractors = ma.pick_distractors(rng, facts, target, lang, n_passages - 1)
    passages = [ma.render_passage(rng, f, lang) for f in distractors]
    passages.insert(rng.randint(0, len(passages)), ma.render_passage(rng, target, lang))
    return ma.Example(lang, target, target.question(rng, lang), passages, distractors)


def passages_doc(rng: random.Random, facts: list[ma.Fact], lang: str) -> str:
    chosen = rng.sample(facts, rng.randint(MIN_DOC_PASSAGES, MAX_DOC_PASSAGES))
    passages = [ma.render_passage(rng, f, lang) for f in chosen]
    joiner = "" if lang == "zh" else rng.choice(("\n", " "))
    return joiner.join(passages)


def rag_doc(rng: random.Random, facts: list[ma.Fact], lang: str) -> str:
    """Exactly the demo's plain prompt + " answer" (the EOS comes from packing)."""
    ex = make_example(rng, facts, lang)
    return ma.rag_prompt(ex.passages, ex.query) + "\nAnswer: " + ex.answer


def entity_doc(rng: random.Random, facts: list[ma.Fact]) -> str:
    """Everything about one to three subjects, so each name recurs (teaches copying names from context)."""
    subjects = rng.sample(sorted({f.subject for f in facts}), rng.randint(1, 3))
    paragraphs = []
    for subject in subjects:
        own = [f for f in facts if f.subject == subject]
        sentences = [f.sentence("en") for f in rng.sample(own, len(own))]
        sentences.insert(rng.randint(0, len(sentences)), own[0].descriptor)
        paragraphs.append(" ".join(sentences))
    return "\n".join(paragraphs)


def reading_doc(rng: random.Random, facts: list[ma.Fact]) -> str:
    """Background passages followed by several questions, each answered from the passages."""
    ex = make_example(rng, facts, "en")
    text = "\n".join(ex.passages)
    answerable = [
        f
        for f in [ex.target, *ex.distractors]
        if sum(ma.contains_answer(p, f.answer("en"), "en") for p in ex.passages) == 1
    ]
    asked = rng.sample(answerable, min(len(answerable), rng.randint(2, 4)))
    qa = [f"Question: {f.question(rng, 'en')}\nAnswer: {f.answer('en')}" for f in asked]
    return "Background:\n" + text + "\n\n" + "\n\n".join(qa)


def repeat_doc(rng: random.Random, facts: list[ma.Fact]) -> str:
    """A list of names written twice: a dense copying signal (it makes induction heads form early)."""
    pool = sorted({n for f in facts for n in fact_names(f)})
    listed = ", ".join(rng.sample(pool, rng.randint(4, 12)))
    intro, again = rng.choice(REPEAT_FRAMES)
    return f"{intro} {listed}.\n{again} {listed}."


def chat_doc(rng: random.Random, facts: list[ma.Fact], tokenizer: PreTrainedTokenizerBase) -> str:
    messages = ma.messages_record(rng, make_example(rng, facts, "en"))["messages"]
    return tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")


def make_doc(rng: random.Random, facts: list[ma.Fact], tokenizer: PreTrainedTokenizerBase) -> str:
    kinds, weights = zip(*DOC_MIX, strict=True)
    kind = rng.choices(kinds, weights)[0]
    lang = "zh" if kind.startswith("zh_") else "en"
    if kind.endswith("passages"):
        return passages_doc(rng, facts, lang)
    if kind.endswith("rag"):
        return rag_doc(rng, facts, lang)
    if kind == "entity":
        return entity_doc(rng, facts)
    if kind == "repeat":
        return repeat_doc(rng, facts)
    if kind == "reading":
        return reading_doc(rng, facts)
    return chat_doc(rng, facts, tokenizer)


@dataclass(frozen=True)
class Corpus:
    docs: list[str]
    names: set[str]  # every invented name used in the corpus


def build_corpus(tokenizer: PreTrainedTokenizerBase) -> Corpus:
    assert SEED != ma.SEED
    rng = random.Random(SEED)
    banned = shipped_words()
    names = ma.NameGenerator(rng)
    names.used.update(banned)  # generated names never equal a shipped word
    docs: list[str] = []
    used: set[str] = set()
    facts: list[ma.Fact] = []
    for i in range(N_DOCS):
        if i % DOCS_PER_WORLD == 0:
            facts = fresh_world(rng, names, banned)
            used.update(n for f in facts for n in fact_names(f))
        docs.append(make_doc(rng, facts, tokenizer))
    return Corpus(docs, used)


def check_disjoint(corpus: Corpus) -> None:
    """No shipped record's query or answer, and no shipped entity name, occurs in the corpus."""
    banned = shipped_words()
    clash = sorted(n for n in corpus.names if n.lower() in banned)
    assert not clash, clash[:10]
    text = "\n".join(corpus.docs)
    for path in sorted(ma.DATA_DIR.glob("sft_rag_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            assert rec["query"] not in text, rec["query"]


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------


def tokenize_docs(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> list[list[int]]:
    """Token ids per document (no BOS is ever added), each ending in exactly one EOS."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return [ids if ids[-1] == eos else [*ids, eos] for ids in encoded]


def pack_rows(docs: list[list[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole documents into rows of `seq_len` (first fit; every row starts at a document start).

    Documents are never split (an over-long one is cut); what is left of a row is padding without labels.
    """
    done: list[list[int]] = []
    open_rows: list[list[int]] = []
    for doc in docs:
        ids = doc[:seq_len]
        i = next((i for i, r in enumerate(open_rows) if len(r) + len(ids) <= seq_len), len(open_rows))
        if i == len(open_rows):
            open_rows.append([])
        open_rows[i] += ids
        if seq_len - len(open_rows[i]) < MIN_ROOM:
            done.append(open_rows.pop(i))
        elif len(open_rows) > MAX_OPEN_ROWS:
            done.append(open_rows.pop(0))
    rows = done + open_rows
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return input_ids, labels


def batch_order(
    n_rows: int, steps: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Row indices for each step: epochs of fresh permutations."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n_rows, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def lr_at(step: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR_RATIO * PEAK_LR."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, STEPS - WARMUP_STEPS)
    return PEAK_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


def repeat_batch(generator: torch.Generator, vocab_size: int, batch_size: int) -> torch.Tensor:
    """Random token strings (no special tokens), each written twice."""
    half = torch.randint(FIRST_TEXT_ID, vocab_size, (batch_size, INDUCTION_HALF), generator=generator)
    return torch.cat([half, half], dim=1)


def corpus_repeat_batch(
    generator: torch.Generator, input_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Random corpus snippets, each written twice: copying must also win where bigram habits disagree."""
    eligible = torch.nonzero(lengths >= INDUCTION_HALF).squeeze(1)
    rows = eligible[torch.randint(len(eligible), (AUX_CORPUS_BATCH,), generator=generator)]
    room = lengths[rows] - INDUCTION_HALF + 1
    starts = (torch.rand(AUX_CORPUS_BATCH, generator=generator) * room).long()
    half = input_ids[rows[:, None], starts[:, None] + torch.arange(INDUCTION_HALF)]
    return torch.cat([half, half], dim=1)


def repeated_half_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean loss on the second copy (its first token excepted): near 0 once the model copies from context."""
    second = logits[:, INDUCTION_HALF:-1].float().log_softmax(-1)
    return -second.gather(-1, ids[:, INDUCTION_HALF + 1 :, None]).mean().item()


def optimizer_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    lr: float,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[float, torch.Tensor]]:
    """One AdamW step at `lr` on the summed loss of (input_ids, labels) batches; per batch: (loss, logits)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros(())
    results = []
    for input_ids, labels in batches:
        out = model(input_ids=input_ids, labels=labels)
        total = total + out.loss
        results.append((out.loss.item(), out.logits.detach()))
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return results


def induction_warmup(
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> float:
    """Phase 1; returns the final repeated-half loss."""
    copy_loss = float("nan")
    for step in range(INDUCTION_STEPS):
        ids = repeat_batch(generator, model.config.vocab_size, INDUCTION_BATCH)
        lr = INDUCTION_LR * min(1.0, (step + 1) / INDUCTION_WARMUP)
        [(_, logits)] = optimizer_step(model, optimizer, lr, [(ids, ids)])
        if (step + 1) % LOG_EVERY == 0:
            copy_loss = repeated_half_loss(logits, ids)
            print(
                f"induction {step + 1:4d}/{INDUCTION_STEPS}  repeated-half loss {copy_loss:.4f}", flush=True
            )
    return copy_loss


def train_corpus(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
) -> float:
    """Phase 2, with a small batch of repeated strings in every step so the copying circuit survives the switch
    to the corpus (without it, the first corpus steps wipe it out) and learns to apply to corpus text too;
    returns the mean corpus loss of the last LOG_EVERY steps."""
    recent: list[float] = []
    lengths = (labels != IGNORE).sum(dim=1)
    start = time.perf_counter()
    for step, idx in enumerate(batch_order(len(input_ids), STEPS, BATCH_SIZE, generator)):
        batches = [(input_ids[idx], labels[idx])]
        if AUX_RANDOM_BATCH or AUX_CORPUS_BATCH:
            rep = torch.cat(
                [
                    repeat_batch(generator, model.config.vocab_size, AUX_RANDOM_BATCH),
                    corpus_repeat_batch(generator, input_ids, lengths),
                ]
            )
            batches.append((rep, rep))
        results = optimizer_step(model, optimizer, lr_at(step), batches)
        loss = results[0][0]
        recent = [*recent[-(LOG_EVERY - 1) :], loss]
        if (step + 1) % LOG_EVERY == 0:
            mean = sum(recent) / len(recent)
            copy = repeated_half_loss(results[1][1], rep) if len(results) > 1 else float("nan")
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1:4d}/{STEPS}  loss {mean:.4f}  repeated-half {copy:.3f}  lr {lr_at(step):.2e}  "
                f"{elapsed:.0f}s",
                flush=True,
            )
    return sum(recent) / len(recent)


def train(model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Full-parameter training, both phases with one optimizer; returns the final corpus loss."""
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(TORCH_SEED)
    model.train()
    induction_warmup(model, optimizer, generator)
    return train_corpus(model, optimizer, generator, input_ids, labels)


def save_weights(model: PreTrainedModel, out_dir: Path) -> Path:
    """Write only model.safetensors (bf16) into `out_dir`; config and tokenizer files stay as they are."""
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        target = out_dir / "model.safetensors"
        shutil.copyfile(Path(tmp) / "model.safetensors", target)
    return target


# ---------------------------------------------------------------------------------------------------------
# Verification: answer loss and greedy answers on the demo's eval split
# ---------------------------------------------------------------------------------------------------------


def eval_prompt(rec: dict[str, Any]) -> str:
    return ma.rag_prompt(rec["retrieval_result"], rec["query"]) + "\nAnswer:"


def answer_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]]
) -> float:
    """Mean cross-entropy over the answer tokens (" answer" + EOS) of all records."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for rec in records:
            prompt = ma.encode(tokenizer, eval_prompt(rec))
            answer = [*ma.encode(tokenizer, " " + rec["answer"]), tokenizer.eos_token_id]
            ids = torch.tensor([prompt + answer])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(answer), reduction="sum")
            total, count = total + loss.item(), count + len(answer)
    return total / count


def greedy_answer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new: int = 16
) -> str:
    ids = ma.encode(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def verify(out_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    lines = EVAL_FILE.read_text(encoding="utf-8").splitlines()[:N_EVAL_RECORDS]
    records = [json.loads(line) for line in lines]
    print(f"base eval answer loss ({len(records)} records): {answer_loss(model, tokenizer, records):.4f}")
    for rec in records[:N_DECODE]:
        print(
            f"  Q: {rec['query']}\n     gold: {rec['answer']!r}  greedy: {greedy_answer(model, tokenizer, eval_prompt(rec))!r}"
        )


def main() -> None:
    torch.set_num_threads(N_THREADS)
    tokenizer = AutoTokenizer.from_pretrained(str(ma.TINY_DIR))
    corpus = build_corpus(tokenizer)
    check_disjoint(corpus)
    input_ids, labels = pack_rows(tokenize_docs(tokenizer, corpus.docs), SEQ_LEN, tokenizer.pad_token_id)
    n_tokens = int((labels != IGNORE).sum())
    print(
        f"corpus: {len(corpus.docs)} docs, {len(corpus.names)} names, {n_tokens} tokens, {len(input_ids)} rows"
    )
    epochs = STEPS * BATCH_SIZE / len(input_ids)
    print(
        f"training: {INDUCTION_STEPS} warm-up steps, then {STEPS} steps x {BATCH_SIZE} x {SEQ_LEN} = {epochs:.2f} epochs"
    )
    torch.manual_seed(TORCH_SEED)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(str(ma.TINY_DIR)))
    start = time.perf_counter()
    final = train(model, input_ids, labels)
    print(f"final loss {final:.4f} after {time.perf_counter() - start:.0f}s")
    target = save_weights(model, ma.TINY_DIR)
    print(f"wrote {target.relative_to(ma.REPO_ROOT)} ({target.stat().st_size / 1e6:.2f} MB)")
    verify(ma.TINY_DIR, tokenizer)


if __name__ == "__main__":
    main()
