"""The dry run's data summary: counts per file, token lengths from the run's own tokenisation, and the passage
tokens data.max_passage_tokens cuts, counted against the prompt the run really renders."""

from __future__ import annotations

from dstrain.config.run import DataConfig
from dstrain.data.index import index_file
from dstrain.data.loader import TokenizedCorpus
from dstrain.data.stream import Corpus
from dstrain.data.summary import Percentiles, passage_tokens, sample_indices, summarize

PASSAGES = ["The river Quodalam flows into Lake Thuthek. It is lined with willows.", "Lake Thuthek is deep."]


def record(query: str, answer: str) -> dict:
    return {"query": query, "retrieval_result": PASSAGES, "answer": answer}


def test_counts_lengths_and_cut_passages(write_jsonl, tokenizer):
    path = write_jsonl(
        [record("Where does the Quodalam flow?", "Lake Thuthek"), "{broken", record("Deep?", "yes")]
    )
    full = passage_tokens(tokenizer, PASSAGES)
    budget = full - 5  # the second passage loses its end
    cfg = DataConfig(train=[str(path)], max_seq_len=512, max_passage_tokens=budget)
    dataset = TokenizedCorpus(Corpus([index_file(path, "sft-rag")]), tokenizer, cfg)
    summary = summarize(dataset, eval_records=0)
    assert (summary.records, summary.bad, summary.sampled, summary.over_long) == (2, 1, 2, 0)
    examples = [dataset[i] for i in range(2)]
    answers = [sum(label != -100 for label in e.labels) for e in examples]
    assert summary.lengths["answer"].max == max(answers)
    assert summary.lengths["prompt"].max == max(
        len(e.input_ids) - a for e, a in zip(examples, answers, strict=True)
    )
    # the rendered prompt is shorter than the uncut one by exactly the tokens the summary says were cut
    assert summary.passages_cut == 2
    uncut = TokenizedCorpus(dataset.corpus, tokenizer, DataConfig(max_seq_len=512, max_passage_tokens=full))[
        0
    ]
    assert len(uncut.input_ids) - len(examples[0].input_ids) == summary.cut_tokens.max >= 5


def test_nothing_cut_within_the_budget_and_even_samples(write_jsonl, tokenizer):
    path = write_jsonl([record("Where?", "there")])
    cfg = DataConfig(max_passage_tokens=passage_tokens(tokenizer, PASSAGES))
    summary = summarize(TokenizedCorpus(Corpus([index_file(path, "sft-rag")]), tokenizer, cfg), 0)
    assert summary.passages_cut == 0 and summary.cut_tokens == Percentiles(0, 0, 0, 0)
    assert sample_indices(5, 10) == [0, 1, 2, 3, 4]
    assert sample_indices(1000, 5) == [0, 249, 499, 749, 999]
