"""Generation-based eval: greedy answers to held-out RAG prompts, scored by exact match and token F1.

Loss and preference accuracy say how the model scores given answers; only generating shows whether it now
*produces* the answer from the passages. Greedy, bounded by `train.eval_max_new_tokens`, left-padded batches
of the micro batch size, over the first `train.eval_generate` samples of each eval set. Under ZeRO-3 with
several ranks every rank holds one shard of each weight, so all ranks must run the same number of forwards:
each rank gets the same number of batches of each set (short shards repeat an item that is not counted) and
`generate` runs with `synced_gpus`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from dstrain.data.batches import IGNORE, Example
from dstrain.data.kto import KtoExample
from dstrain.data.pairs import PairExample
from dstrain.data.prompts import stop_token_ids
from dstrain.data.sharding import equal_rank_batches
from dstrain.distributed.collectives import all_reduce_sum
from dstrain.distributed.stop import interruptible
from dstrain.eval.sets import metrics_by_set

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class GenerationItem:
    prompt_ids: list[int]
    gold: str  # the reference answer as text (EOS dropped)


def generation_items(
    examples: list[Example] | list[PairExample] | list[KtoExample],
    tokenizer: PreTrainedTokenizerBase,
    limit: int,
) -> list[GenerationItem]:
    """Prompt and reference answer of the first `limit` eval samples (for pairs: the chosen answer; for KTO
    examples: the desirable ones)."""
    items = []
    examples = [e for e in examples if not isinstance(e, KtoExample) or e.desirable]
    for example in examples[:limit]:
        if isinstance(example, KtoExample):
            prompt, answer = example.prompt_ids, example.answer_ids
        elif isinstance(example, PairExample):
            prompt, answer = example.prompt_ids, example.chosen_ids
        else:
            start = next(i for i, label in enumerate(example.labels) if label != IGNORE)
            prompt, answer = example.input_ids[:start], example.labels[start:]
        gold = tokenizer.decode([t for t in answer if t != IGNORE], skip_special_tokens=True)
        items.append(GenerationItem(prompt, gold.strip()))
    return items


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation and ch not in "，。！？、；：")
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    """Words of the normalised answer; CJK characters count one each (Chinese has no spaces)."""
    tokens: list[str] = []
    for word in normalize(text).split():
        tokens += list(word) if _CJK.search(word) else [word]
    return tokens


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def left_pad(
    tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded with the pad token, so that every row's next token is
    generated at the same column."""
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def rank_batches(
    items: list[GenerationItem], batch: int, rank: int, world: int
) -> list[tuple[list[GenerationItem], int]]:
    """This rank's batches as (items, number that count); every rank gets the same number of batches,
    each of the same size (short shares repeat the first item, which is not scored)."""
    return equal_rank_batches(items, batch, rank, world, filler=items[0] if items else None)


@torch.no_grad()
def greedy_answers(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    synced: bool,
) -> list[str]:
    ids, mask = left_pad(tokenizer, prompts)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer),  # a chat answer ends at the template's end-of-turn token
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=synced,
    )
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


@dataclass(frozen=True)
class GenerationEval:
    """What a generation eval needs besides the model; built once per run."""

    tokenizer: PreTrainedTokenizerBase
    sets: dict[str, list[GenerationItem]]  # by eval set name ("": the unnamed set), each set's first N
    max_new_tokens: int
    synced: bool  # ZeRO-3 on several ranks: generate with synced_gpus


def evaluate_generation(
    model: PeftModel,
    gen: GenerationEval,
    batch: int,
    rank: int,
    world: int,
    interrupted: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """eval_exact_match and eval_token_f1 over the answers of all sets, and each named set's own
    (`eval_exact_match/<name>`); a collective: every rank calls it. `interrupted` is asked before each
    batch (training.phases)."""
    local = [_answer_sums(model, gen, items, batch, rank, world, interrupted) for items in gen.sets.values()]
    return metrics_by_set(list(gen.sets), all_reduce_sum(torch.stack(local)), _answer_metrics)


def _answer_sums(
    model: PeftModel,
    gen: GenerationEval,
    items: list[GenerationItem],
    batch: int,
    rank: int,
    world: int,
    interrupted: Callable[[], bool] | None,
) -> torch.Tensor:
    """This rank's [exact match, token F1, answers] of one set, in as many batches as every other rank."""
    totals = torch.zeros(3, dtype=torch.float64)
    for chunk, real in interruptible(rank_batches(items, batch, rank, world), interrupted):
        prompts = [item.prompt_ids for item in chunk]
        predictions = greedy_answers(model, gen.tokenizer, prompts, gen.max_new_tokens, gen.synced)
        for item, prediction in zip(chunk[:real], predictions, strict=False):
            totals += torch.tensor(
                [exact_match(prediction, item.gold), token_f1(prediction, item.gold), 1.0],
                dtype=torch.float64,
            )
    return totals


def _answer_metrics(sums: torch.Tensor) -> dict[str, float]:
    em, f1, count = sums.tolist()
    count = max(count, 1.0)
    return {"eval_exact_match": em / count, "eval_token_f1": f1 / count}
