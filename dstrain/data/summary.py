"""What the training data looks like to the run, before it trains: records and bad records per file, token
lengths of prompts and answers, and how much of the retrieved passages `data.max_passage_tokens` cuts away.

Lengths come from the run's own tokenisation (`TokenizedCorpus`: template, chat template, truncation), over
an evenly spread sample of at most `SAMPLE` records, so a summary of a billion-token corpus takes seconds;
the sample size is part of the summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from dstrain.data.batches import IGNORE, Example
from dstrain.data.loader import TokenizedCorpus
from dstrain.data.pairs import PairExample
from dstrain.data.prompts import SEPARATOR, fit_passages
from dstrain.data.records import BadRecord, RagRecord

SAMPLE = 2000  # records tokenised for the length percentiles (all of them when there are fewer)


@dataclass(frozen=True)
class Percentiles:
    p50: int
    p90: int
    p99: int
    max: int

    @classmethod
    def of(cls, values: Sequence[int]) -> Percentiles:
        if not values:
            return cls(0, 0, 0, 0)
        p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99], method="nearest")
        return cls(int(p50), int(p90), int(p99), int(max(values)))


@dataclass(frozen=True)
class FileSummary:
    path: str
    records: int  # valid records
    bad: int
    cleaned: int  # valid records data.clean changed


@dataclass(frozen=True)
class DataSummary:
    files: list[FileSummary]
    eval_records: int
    sampled: int  # records tokenised for the lengths below
    over_long: int  # of the sampled: records the run cannot train on (prompt over data.max_seq_len, ...)
    lengths: dict[str, Percentiles]  # tokens per "prompt" and "answer" (pairs: "chosen", "rejected")
    max_passage_tokens: int
    passages_cut: int | None  # of the sampled: prompts whose passages were cut (None: no passages)
    cut_tokens: Percentiles | None  # passage tokens cut from each of those prompts

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    @property
    def bad(self) -> int:
        return sum(f.bad for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "records": self.records, "bad": self.bad}


def sample_indices(n: int, limit: int = SAMPLE) -> list[int]:
    """`limit` indices spread evenly over 0..n-1 (all of them when n <= limit)."""
    if n <= limit:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit)})


def token_lengths(item: Example | PairExample) -> dict[str, int]:
    if isinstance(item, PairExample):
        return {
            "prompt": len(item.prompt_ids),
            "chosen": len(item.chosen_ids),
            "rejected": len(item.rejected_ids),
        }
    answer = sum(1 for label in item.labels if label != IGNORE)
    return {"prompt": len(item.input_ids) - answer, "answer": answer}


def passage_tokens(tokenizer: PreTrainedTokenizerBase, passages: Sequence[str]) -> int:
    """Tokens of the passages as the prompt joins them (separators counted, as fit_passages counts them)."""
    if not passages:
        return 0
    separator = len(tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
    pieces = tokenizer(list(passages), add_special_tokens=False)["input_ids"]
    return sum(len(ids) for ids in pieces) + separator * (len(passages) - 1)


def passages_cut_by(tokenizer: PreTrainedTokenizerBase, record: RagRecord, budget: int) -> int:
    """How many passage tokens data.max_passage_tokens cuts from this record's prompt (0: none)."""
    full = passage_tokens(tokenizer, record.passages)
    if full <= budget:
        return 0
    return full - passage_tokens(tokenizer, fit_passages(tokenizer, record.passages, budget))


def summarize(dataset: TokenizedCorpus, eval_records: int, limit: int = SAMPLE) -> DataSummary:
    """The summary of a run's training set (`eval_records`: its tokenised eval set's size)."""
    corpus, tokenizer, budget = dataset.corpus, dataset.tokenizer, dataset.cfg.max_passage_tokens
    files = [FileSummary(f.path, len(f), f.num_bad, f.num_cleaned) for f in corpus.files]
    lengths: dict[str, list[int]] = {}
    cuts: list[int] = []
    over_long = 0
    picked = sample_indices(len(dataset), limit)
    for index in picked:
        item = dataset[index]
        if isinstance(item, BadRecord):
            over_long += 1
            continue
        for key, value in token_lengths(item).items():
            lengths.setdefault(key, []).append(value)
        record = corpus.read(index)
        if isinstance(record, RagRecord):
            cuts.append(passages_cut_by(tokenizer, record, budget))
    cut = [c for c in cuts if c > 0]
    return DataSummary(
        files=files,
        eval_records=eval_records,
        sampled=len(picked),
        over_long=over_long,
        lengths={key: Percentiles.of(values) for key, values in lengths.items()},
        max_passage_tokens=budget,
        passages_cut=len(cut) if cuts else None,
        cut_tokens=Percentiles.of(cut) if cuts else None,
    )
