"""Adapter variants in real 2-rank ZeRO-3 jobs (started by torchrun, gloo on CPU). Two runs cover the five:

- `pissa`: PiSSA (pissa_niter_4) + DoRA + LoRA+ (ratio 16), ZeRO-3 with CPU offload (DeepSpeedCPUAdam with
  two param groups), LoRA dropout on (DoRA's dropout branch, and the RNG on resume);
- `olora`: OLoRA + DoRA + rsLoRA + LoRA+ (ratio 4), ZeRO-3 with torch's AdamW as DeepSpeed's client
  optimizer (two param groups) and the sequence split over the two ranks (Ulysses).

Each run's saved adapter, loaded by PEFT onto the ORIGINAL base (PiSSA/OLoRA changed the weights the run
trained on), reproduces the run's eval loss; the pissa run resumes bitwise from its middle checkpoint on 2
ranks (the residual base rebuilt from the checkpoint), the olora run on 1 rank without sequence parallelism
(another world size: equal within summation order); LoRA+'s lora_B group runs at 16 x the LR in the
optimizer and in the log; `export --merge` loads in transformers with the adapter's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dstrain.checkpoint.export import export_checkpoint
from dstrain.config.run import ModelConfig
from dstrain.model.build import builtin_dir, load_base_model
from tests.distributed.test_resume_zero import (
    ELASTIC_RTOL,
    FINAL,
    MIDDLE,
    STEPS,
    final_tensors,
    fork_at_middle,
    losses,
)
from tests.families import own_loss
from tests.helpers import (
    check,
    dstrain,
    make_small_data,
    metrics,
    train_ranks,
    ulps_at_largest,
    write_config,
)

pytestmark = pytest.mark.distributed

# LoRA+ ratios are powers of 2: ratio x lr is exact, so the two groups' LRs compare exactly
RUNS = {
    "pissa": {
        "ds_config": "ds_configs/zero3_offload.json",
        "lora": {
            "dropout": 0.1,
            "use_dora": True,
            "init_lora_weights": "pissa_niter_4",
            "loraplus_lr_ratio": 16.0,
        },
        "train": {},
    },
    "olora": {
        "ds_config": "ds_configs/zero3.json",
        "lora": {
            "dropout": 0.0,
            "use_dora": True,
            "use_rslora": True,
            "init_lora_weights": "olora",
            "loraplus_lr_ratio": 4.0,
        },
        "train": {"sequence_parallel_size": 2},
    },
}


def launch(tmp: Path, name: str) -> Path:
    spec = RUNS[name]
    config = write_config(
        tmp,
        make_small_data(tmp),
        "full",
        ds_config=spec["ds_config"],
        lora={"r": 8, "alpha": 16, **spec["lora"]},
        train={"max_steps": STEPS, "save_every": MIDDLE, "log_every": 1, **spec["train"]},
    )
    check(train_ranks(config, cwd=tmp))
    return tmp / "full"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both runs, launched once for every test of this module (each launch is the expensive part)."""
    return {name: launch(tmp_path_factory.mktemp(name), name) for name in RUNS}


def peft_adapted(ckpt: Path) -> PeftModel:
    return PeftModel.from_pretrained(load_base_model(ModelConfig()), str(ckpt)).eval()


@pytest.mark.parametrize("name", list(RUNS))
def test_the_adapter_reproduces_the_eval_loss_on_the_original_base(runs, name):
    run_dir = runs[name]
    config = json.loads((run_dir / FINAL / "adapter_config.json").read_text())
    # PEFT's plain-LoRA conversion of the PiSSA/OLoRA adapter: twice the rank, plain init, variants kept
    assert (config["r"], config["init_lora_weights"], config["use_dora"]) == (16, True, True)
    (last,) = [
        row["eval_loss"] for row in metrics(run_dir) if row.get("step") == STEPS and "eval_loss" in row
    ]
    eval_file = run_dir.parent / "eval.jsonl"
    assert own_loss(peft_adapted(run_dir / FINAL), builtin_dir("tiny"), eval_file) == pytest.approx(
        last, rel=1e-4
    )


def test_pissa_dora_loraplus_resume_on_two_ranks_is_bitwise(runs, tmp_path):
    full = runs["pissa"]
    fork = fork_at_middle(full, "resumed")
    check(dstrain("resume", str(fork), "--num-gpus", "2", cwd=tmp_path))
    assert losses(fork) == losses(full)
    want, got = final_tensors(full), final_tensors(fork)
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_olora_resume_on_one_rank_without_sequence_parallelism(runs, tmp_path):
    """Another world size and no sequence split: equal up to summation order (the loss sums, the attention
    and the gradient reduction all run in another order than on the 2 sequence-parallel ranks)."""
    full = runs["olora"]
    fork = fork_at_middle(full, "on_one")
    check(dstrain("resume", str(fork), "--set", "train.sequence_parallel_size=1", cwd=tmp_path))
    got, want = losses(fork), losses(full)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(MIDDLE + 1, STEPS + 1)] == pytest.approx(
        [want[s] for s in range(MIDDLE + 1, STEPS + 1)], rel=ELASTIC_RTOL
    )
    # 1024 ulps of each tensor's largest entry: measured 314 at worst (an exp_avg_sq entry near zero), where
    # test_resume_zero's ZeRO-only elastic resume allows 256
    a, b = final_tensors(fork), final_tensors(full)
    for key in b:
        atol = ulps_at_largest(b[key], 1024)
        torch.testing.assert_close(
            a[key], b[key], rtol=ELASTIC_RTOL, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("name", list(RUNS))
def test_loraplus_lora_b_trains_at_ratio_times_the_lr(runs, name):
    """DeepSpeedCPUAdam (pissa run) and torch AdamW (olora run): the groups' LRs in the log, in the
    optimizer's own groups as the checkpoint read them, and one schedule in the resolved JSON."""
    run_dir, ratio = runs[name], RUNS[name]["lora"]["loraplus_lr_ratio"]
    rows = [row for row in metrics(run_dir) if "loss" in row]
    assert len(rows) == STEPS and any(row["lr"] > 0 for row in rows)
    assert [row["lr/lora_B"] for row in rows] == [ratio * row["lr"] for row in rows]
    for step in (MIDDLE, STEPS):
        sched = json.loads((run_dir / f"checkpoints/step-{step:08d}/scheduler.json").read_text())
        base, fast = sched["param_group_lr"]
        assert fast == ratio * base
    # the JSON keeps one schedule: the planned schedule scales each group by its own initial LR
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["scheduler"]["params"]["warmup_max_lr"] == ds["optimizer"]["params"]["lr"]


def test_export_merge_loads_in_transformers_with_the_adapter_logits(runs, tmp_path):
    ckpt = runs["pissa"] / FINAL
    merged_dir = tmp_path / "merged"  # export_checkpoint returns the checkpoint it used, not this dir
    export_checkpoint(ckpt, merged_dir, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.randint(4, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = peft_adapted(ckpt)(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
