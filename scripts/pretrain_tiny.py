#!/usr/bin/env python
"""Pretrain the bundled tiny Llama and ship its weights as ``dstrain/assets/tiny/model.safetensors`` (bf16).

Run from the repository root (about 6 minutes on 2 CPU cores)::

    /work/venv/bin/python scripts/pretrain_tiny.py

The corpus is synthetic text from the generator in ``scripts/make_assets.py``, driven by a different seed
and with every invented name kept disjoint from the shipped data files, so the demo's QA records never
appear in it. It mixes passage groups (fact sentences plus answer-free filler sentences), documents in the
RAG prompt shape (``Background: ... Question: ... Answer: ...``), chat-template conversations and a little
Chinese. The model sees the format, but a LoRA SFT on the demo data still has something to learn.

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
DOC_MIX = (  # (kind, probability)
    ("passages", 0.52),
    ("rag", 0.30),
    ("chat", 0.12),
    ("zh_passages", 0.03),
    ("zh_rag", 0.03),
)
MIN_DOC_PASSAGES, MAX_DOC_PASSAGES = 3, 8

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


def train(model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Full-parameter training; returns the mean loss of the last LOG_EVERY steps."""
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(TORCH_SEED)
    model.train()
    recent: list[float] = []
    start = time.perf_counter()
    for step, idx in enumerate(batch_order(len(input_ids), STEPS, BATCH_SIZE, generator)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-(LOG_EVERY - 1) :], loss.item()]
        if (step + 1) % LOG_EVERY == 0:
            mean = sum(recent) / len(recent)
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1:4d}/{STEPS}  loss {mean:.4f}  lr {lr_at(step):.2e}  {elapsed:.0f}s",
                flush=True,
            )
    return sum(recent) / len(recent)


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
    print(
        f"training: {STEPS} steps x {BATCH_SIZE} x {SEQ_LEN} = {STEPS * BATCH_SIZE / len(input_ids):.2f} epochs"
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
