"""Sequence parallelism pieces: group arithmetic, the split of a micro batch (shift before the cut, padding to
a multiple of N, global positions, masks), the head checks, and SupervisedLM's sharded forward on 2 gloo
processes against the unsharded one (padded SFT rows, packed rows, shared-prompt pairs), with a negative
control (no exchange between the ranks) that must differ."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from dstrain.data.batches import IGNORE, Example, collate
from dstrain.data.packing import collate_packed
from dstrain.data.pairs import PairExample, collate_shared_pairs
from dstrain.distributed import sequence
from dstrain.distributed.env import free_port


def test_group_arithmetic():
    assert [sequence.data_parallel_rank(r, 2) for r in range(4)] == [0, 0, 1, 1]
    assert sequence.group_ranks(3, 2) == [2, 3]
    assert sequence.group_ranks(5, 4) == [4, 5, 6, 7]


def test_check_heads():
    assert sequence.check_heads(4, 2, 2) == []
    assert sequence.check_heads(4, 1, 4) == []  # MQA: the one kv head is replicated
    assert sequence.check_heads(8, 8, 1) == []
    assert "divide the model's 6 attention heads" in sequence.check_heads(6, 6, 4)[0]
    assert "key/value heads" in sequence.check_heads(12, 3, 4)[0]


def test_slices_rebuild_the_shifted_padded_batch():
    ids = torch.arange(1, 15).reshape(2, 7)
    labels = ids.clone()
    labels[:, :3] = IGNORE
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    pieces = [sequence.shard_batch(ids, mask, labels, None, None, r, 2) for r in range(2)]
    assert all(p.input_ids.shape == (2, 4) for p in pieces)
    targets = torch.cat([p.targets for p in pieces], dim=1)
    expected = torch.full((2, 8), IGNORE)
    expected[:, :6] = labels[:, 1:]  # the target of position t is label t + 1; the pad column has none
    assert torch.equal(targets, expected)
    assert torch.equal(torch.cat([p.position_ids for p in pieces], 1), torch.arange(8).expand(2, 8))
    assert torch.equal(torch.cat([p.input_ids for p in pieces], 1)[:, :7], ids)
    assert pieces[0].attention_mask is None and pieces[0].padding is None  # right padding: causal is exact


def test_left_padding_and_4d_masks_stay_whole():
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    piece = sequence.shard_batch(torch.ones(1, 5, dtype=torch.long), mask, torch.ones(1, 5), None, None, 1, 2)
    assert piece.attention_mask is None and piece.padding.tolist() == [[0, 1, 1, 1, 1, 0]]
    block = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    piece = sequence.shard_batch(
        torch.ones(1, 5, dtype=torch.long), block, torch.ones(1, 5), None, None, 0, 2
    )
    assert piece.attention_mask.shape == (1, 1, 6, 6)  # the whole (padded) sequence's mask on every rank
    assert piece.attention_mask[0, 0, 5].tolist() == [False] * 5 + [True]  # the added position sees itself


def batches() -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 2000, (n,), generator=g).tolist()

    rows = [Example(tokens(23), [IGNORE] * 15 + tokens(8)), Example(tokens(17), [IGNORE] * 9 + tokens(8))]
    pairs = [PairExample(tokens(12), tokens(5), tokens(7)), PairExample(tokens(9), tokens(6), tokens(3))]
    return {
        "padded": collate(rows, 0),
        "packed": collate_packed(rows, 0, 48),
        "pairs": collate_shared_pairs(pairs, 0),
    }


def terms(lm, batch: dict, pairs: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the forward's values, the LoRA gradients of a loss built from them)."""
    out = lm(**batch, pairs=pairs, reference=False) if pairs else lm(**batch)
    loss = out[0].sum() if pairs else out[0] / out[1]
    lm.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.clone() for p in lm.parameters() if p.requires_grad]
    return [t.detach() for t in out if t is not None], grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


def worker(rank: int, port: int, exchange: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from dstrain.model import ulysses
    from dstrain.model.supervised import SupervisedLM
    from tests.helpers import lora_model

    lm = SupervisedLM(lora_model(), logits_chunk_tokens=16)
    reference = {k: terms(lm, b, k == "pairs") for k, b in batches().items()}
    groups = sequence.start(2)
    lm.groups = groups
    alone = [torch.distributed.new_group([r]) for r in range(2)]  # collective: both ranks build both
    ulysses.install(lm.peft_model.get_base_model(), groups.sp_group if exchange else alone[rank])
    # without the exchange only the causal (mask-free) layout can run: a full 4D mask needs all queries
    for kind, batch in batches().items() if exchange else [("padded", batches()["padded"])]:
        values, grads = terms(lm, batch, kind == "pairs")
        for g in grads:  # what DeepSpeed does with the group's gradients: sum them
            torch.distributed.all_reduce(g)
        # relative to each tensor's largest entry
        worst = max(
            relative(a, b)
            for a, b in zip(values + grads, [*reference[kind][0], *reference[kind][1]], strict=True)
        )
        queue.put((rank, kind, worst))
    torch.distributed.destroy_process_group()


def run_pair(exchange: bool) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, exchange, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in range(6 if exchange else 2)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    worst: dict[str, float] = {}
    for _, kind, diff in results:
        worst[kind] = max(worst.get(kind, 0.0), diff)
    return worst


@pytest.mark.timeout(300)
def test_sharded_forward_matches_unsharded():
    worst = run_pair(exchange=True)
    assert all(diff < 1e-5 for diff in worst.values()), worst
    control = run_pair(exchange=False)  # each rank attends its own slice only: must be visibly wrong
    assert all(diff > 1e-3 for diff in control.values()), control


def shipped(name: str) -> dict:
    import json
    from importlib import resources

    return json.loads((resources.files("dstrain") / "ds_configs" / name).read_text())


def run_config(size: int, **model):
    from dstrain.config.run import DataConfig, ModelConfig, RunConfig, TrainConfig

    data = DataConfig(train=["unused.jsonl"], packing=bool(model.pop("packing", False)))
    return RunConfig(data=data, model=ModelConfig(**model), train=TrainConfig(sequence_parallel_size=size))


def test_batch_plan_counts_samples_over_data_parallel_ranks():
    from dstrain.config.zero import resolve_ds_config

    raw = {**shipped("zero3.json"), "train_micro_batch_size_per_gpu": 2, "train_batch_size": 8}
    ds, plan = resolve_ds_config(raw, run_config(2), world=4, total_steps=10, hidden_size=64)
    assert (plan.micro, plan.accumulation, plan.world, plan.devices) == (2, 2, 2, 4)
    assert ds["train_batch_size"] == 8 and ds["sequence_parallel_size"] == 2
    assert ds["zero_optimization"]["reduce_scatter"] is False  # ZeRO-3's right path under Ulysses
    assert ds["zero_optimization"]["contiguous_gradients"] is True


def test_sequence_parallel_problems_are_reported_with_the_others():
    from dstrain.config.zero import resolve_ds_config
    from dstrain.errors import ConfigError

    raw = shipped("zero3.json")
    raw["zero_optimization"]["reduce_scatter"] = True
    cfg = run_config(3, attn_implementation="flash_attention_2", packing=True)
    with pytest.raises(ConfigError) as caught:
        resolve_ds_config(raw, cfg, world=4, total_steps=10, hidden_size=64)
    text = str(caught.value)
    assert "does not divide the world size 4" in text
    assert "flat packed row" in text
    assert "reduce_scatter false" in text


def test_bucket_smaller_than_a_trainable_tensor_is_refused():
    from dstrain.errors import ConfigError

    ds = {"sequence_parallel_size": 2, "zero_optimization": {"stage": 3, "reduce_bucket_size": 100}}
    sequence.check_bucket(ds, [torch.nn.Parameter(torch.zeros(10, 10))])  # fits: nothing said
    with pytest.raises(ConfigError, match="reduce_bucket_size to at least 101"):
        sequence.check_bucket(ds, [torch.nn.Parameter(torch.zeros(101))])


def test_memory_estimate_counts_one_slice_per_rank():
    from dstrain.model.memory import setup_from

    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 900}}
    whole = setup_from(run_config(1), ds, micro=1, world=2)
    half = setup_from(run_config(2), ds, micro=1, world=2)
    assert half.seq == -(-whole.seq // 2)


def test_models_the_attention_cannot_run_exactly_are_named():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from dstrain.model.ulysses import unsupported

    assert unsupported(LlamaConfig()) is None and unsupported(Qwen2Config()) is None
    assert unsupported(Gemma2Config()) == "attention-logit soft-capping"
    assert unsupported(MistralConfig(sliding_window=4096)) == "sliding-window attention"
    assert unsupported(Qwen2Config(use_sliding_window=True, sliding_window=64)) == "sliding-window attention"
