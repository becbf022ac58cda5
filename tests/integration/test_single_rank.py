"""One local process, as `dstrain train` runs it: run-dir contract, checkpoints, and the loss itself."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from dstrain.checkpoint.layout import read_latest, verify_checkpoint
from dstrain.config.run import load_config
from dstrain.data.batches import collate
from dstrain.data.loader import MicroBatchSampler
from dstrain.model.build import load_base_model
from dstrain.training.prepare import prepare
from tests.helpers import check, metrics, train_single, write_config

CONTRACT_FIELDS = {
    "step",
    "loss",
    "lr",
    "tokens_per_s",
    "samples",
    "tokens",
    "data_wait_s",
    "mem_gb",
    "skipped_records",
    "skipped_reads",
    "skipped_steps",
    "samples_per_s",
    "step_time_s",
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("single")
    from tests.helpers import make_small_data

    # Records in shuffled order, not grouped by length: test_first_step_loss_equals_plain_transformers
    # rebuilds step 1's micro batches with the plain sampler.
    files = make_small_data(tmp_path)
    train = {"max_steps": 4, "save_every": 2, "eval_every": 2, "plot": True}  # the whole run dir
    config = write_config(tmp_path, files, train=train, data={"group_by_length": False})
    proc = check(train_single(config, cwd=tmp_path))
    return tmp_path, config, proc


def test_run_directory_contract(finished_run):
    tmp_path, _, _proc = finished_run
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "loss.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    rows = metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for row in train_rows:
        assert row.keys() >= CONTRACT_FIELDS
        assert row["tokens_per_s"] > 0 and row["tokens"] > 0 and row["mem_gb"] > 0
    assert [r["samples"] for r in train_rows] == [8, 16, 24, 32]
    assert all(b["tokens"] > a["tokens"] for a, b in itertools.pairwise(train_rows))
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["eval_loss"] > 0 for r in evals)
    resolved = json.loads((run_dir / "ds_config.json").read_text())
    assert "auto" not in json.dumps(resolved)
    assert resolved["train_batch_size"] == 8 and resolved["gradient_accumulation_steps"] == 2
    png = (run_dir / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_tensorboard_events_read_back_with_tensorboards_reader(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, _, _ = finished_run
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/mem_gb", "eval/loss"} <= tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # float32 in TB
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4]


def test_checkpoints_are_complete_and_peft_loadable(finished_run):
    tmp_path, _, _ = finished_run
    root = tmp_path / "run" / "checkpoints"
    assert read_latest(root) == "step-00000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    ckpt = root / "step-00000004"
    assert verify_checkpoint(ckpt) == []
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_state.json",
        "manifest.json",
    } <= names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl"))], "no pickles in a checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["samples"] == 32 and state["world_size"] == 1
    model = PeftModel.from_pretrained(load_base_model(load_config(tmp_path / "run.yaml").model), str(ckpt))
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0


def test_first_step_loss_equals_plain_transformers(finished_run):
    """The logged loss of step 1 (no update yet) equals transformers' own labels= loss on the step's records."""
    tmp_path, config, _ = finished_run
    cfg = load_config(config)
    prepared = prepare(cfg, world=1)
    sampler = MicroBatchSampler(len(prepared.train), prepared.plan, 0, cfg.data.seed, prepared.total_steps)
    order = iter(sampler)
    micro_batches = [next(order) for _ in range(prepared.plan.accumulation)]  # step 1's micro batches
    model = load_base_model(cfg.model).eval()  # fresh LoRA starts at B=0: the base model's function
    records = [prepared.train[i] for indices in micro_batches for i in indices]
    with torch.no_grad():  # one padded batch: transformers' mean over every labelled token of the step
        expected = model(**collate(records, prepared.tokenizer.pad_token_id)).loss.item()
    # objective.loss_normalization: global, the token-weighted loss of the whole global batch; its sums run in
    # another order than one padded batch's (fp32)
    logged = next(row["loss"] for row in metrics(tmp_path / "run") if "loss" in row)
    assert logged == pytest.approx(expected, rel=1e-5)
