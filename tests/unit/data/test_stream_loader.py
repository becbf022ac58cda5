"""The real pipeline (files -> index -> corpus -> tokenise in workers -> micro batches) over 0/2 workers and
1/2 ranks: an epoch visits every record once, and a restart at any step on any world size yields exactly the
rest of the order."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dstrain.config.run import DataConfig
from dstrain.config.zero import BatchPlan
from dstrain.data.index import index_file
from dstrain.data.loader import LoaderOptions, TokenizedCorpus, train_loader
from dstrain.data.stream import Corpus

GLOBAL = 6  # global batch: micro x accumulation x world
PLANS = {1: BatchPlan(3, 2, 1), 2: BatchPlan(3, 1, 2)}
N = 48  # 8 steps per epoch, nothing dropped
SHUFFLE = {"shuffle_block": 4, "shuffle_window": 3}  # small blocks and windows: the order crosses windows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> TokenizedCorpus:
    """N records over a JSONL and a Parquet file; record k's answer is `rec<k>`, so batches trace back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("stream")
    rows = [{"query": f"q{k}?", "retrieval_result": [f"passage {k}"], "answer": f"rec{k}"} for k in range(N)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    pq.write_table(pa.Table.from_pylist(rows[30:]), root / "b.parquet", row_group_size=7)
    corpus = Corpus([index_file(root / "a.jsonl", "sft-rag"), index_file(root / "b.parquet", "sft-rag")])
    return TokenizedCorpus(corpus, tokenizer, DataConfig(max_seq_len=64, max_passage_tokens=16))


@pytest.fixture(scope="module")
def ids_of(dataset: TokenizedCorpus) -> dict[tuple[int, ...], int]:
    table = {tuple(dataset[k].input_ids): k for k in range(N)}
    assert len(table) == N
    return table


def global_batches(
    dataset: TokenizedCorpus, ids_of: dict, world: int, workers: int, total: int, start: int = 0
) -> list[list[int]]:
    """Each step's records, in slot order (accumulation, then rank), read back from the token ids."""
    plan = PLANS[world]
    per_rank = []
    for rank in range(world):
        options = LoaderOptions(pad_id=0, seed=7, num_workers=workers, **SHUFFLE)
        loader = train_loader(dataset, plan, options, rank, total_steps=total, start_step=start)
        rows = []
        for micro in loader:
            assert micro.samples == plan.micro and not micro.bad
            mask = micro.inputs["attention_mask"].bool()
            rows.append(
                [
                    ids_of[tuple(ids[m].tolist())]
                    for ids, m in zip(micro.inputs["input_ids"], mask, strict=True)
                ]
            )
        per_rank.append(rows)
    steps = []
    for step in range(total - start):
        records: list[int] = []
        for accum in range(plan.accumulation):
            for rank in range(world):
                records += per_rank[rank][step * plan.accumulation + accum]
        steps.append(records)
    return steps


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_visits_every_record_once(dataset, ids_of, world, workers):
    steps = global_batches(dataset, ids_of, world, workers, total=N // GLOBAL)
    seen = [k for step in steps for k in step]
    assert sorted(seen) == list(range(N))
    assert seen != list(range(N))  # shuffled


@pytest.mark.parametrize(("world", "workers", "resume_world", "resume_workers"), [(2, 2, 1, 0), (1, 0, 2, 2)])
def test_restart_at_any_step_yields_exactly_the_rest(
    dataset, ids_of, world, workers, resume_world, resume_workers
):
    total = 2 * N // GLOBAL + 3  # two epochs and a bit
    uninterrupted = global_batches(dataset, ids_of, world, workers, total)
    assert uninterrupted == global_batches(dataset, ids_of, resume_world, resume_workers, total)
    for start in (1, 5, N // GLOBAL, total - 1):
        rest = global_batches(dataset, ids_of, resume_world, resume_workers, total, start)
        assert rest == uninterrupted[start:], start
        done = [k for step in uninterrupted[:start] for k in step]
        assert len(done) + sum(map(len, rest)) == total * GLOBAL  # no record missed or repeated


def test_packing_changes_the_layout_not_the_records(dataset, ids_of):
    plan = PLANS[1]
    options = LoaderOptions(pad_id=0, seed=7, **SHUFFLE)
    padded = list(train_loader(dataset, plan, options, rank=0, total_steps=4))
    packed = list(train_loader(dataset, plan, replace(options, pack_to=64), rank=0, total_steps=4))
    for a, b in zip(padded, packed, strict=True):
        assert (a.tokens, a.samples) == (b.tokens, b.samples)
        assert b.inputs["input_ids"].shape[0] < a.inputs["input_ids"].shape[0]
        assert sorted(a.inputs["input_ids"][a.inputs["attention_mask"].bool()].tolist()) == sorted(
            b.inputs["input_ids"][b.inputs["position_ids"].ne(0) | b.inputs["input_ids"].ne(0)].tolist()
        )
