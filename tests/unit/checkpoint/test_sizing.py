"""The checkpoint size dstrain estimates before a save (dstrain.checkpoint.sizing), against real checkpoints
written by dstrain on 1 and 2 ranks (the golden fixtures), from a model built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from dstrain.checkpoint import optim, sizing
from dstrain.config.run import config_from_dict
from dstrain.model.build import add_lora

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden" / "ckpt2-v0.2.0.dev0"
CONFIG_FILES = ("config.yaml", "ds_config.json", "ds_config.source.json")
# The tensor files are computed to the byte; the small JSON files (trainer state, scheduler, adapter config,
# manifest) are estimated. Measured error: under 100 bytes with the config files' sizes given, under 600
# without. The bound below is that, with room for a longer data path or library version string.
TOLERANCE_BYTES = 1024


def meta_model(world: Path, ckpt: Path) -> torch.nn.Module:
    """The golden run's model with its LoRA, on the meta device: shapes only, no weights, no memory."""
    spec = json.loads((world / "model.json").read_text())
    spec.pop("seed")
    cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(LlamaConfig(**spec, tie_word_embeddings=False))
        return add_lora(base, cfg.lora)


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_estimate_matches_a_real_checkpoint(world_size: int):
    world = GOLDEN / f"world{world_size}"
    ckpt = world / "run" / "checkpoints" / "step-00000002"
    model = meta_model(world, ckpt)
    assert next(model.parameters()).device.type == "meta"
    shapes = sizing.trainable_shapes(model)
    assert shapes == sizing.shapes_in_checkpoint(ckpt)  # the names and shapes the save wrote
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    size = sizing.checkpoint_size(shapes, world_size, config_bytes=sum(files[n] for n in CONFIG_FILES))
    assert size.adapter == files["adapter_model.safetensors"]  # to the byte
    assert size.optimizer == files["optimizer.safetensors"]
    assert size.rng == sum(v for k, v in files.items() if k.startswith("rng_state_"))
    assert abs(size.total - sum(files.values())) <= TOLERANCE_BYTES
    assert abs(sizing.checkpoint_bytes(shapes, world_size) - sum(files.values())) <= TOLERANCE_BYTES


def test_the_optimizer_keys_are_the_ones_the_save_writes():
    assert (sizing.MASTER, sizing.MOMENTS) == (optim.MASTER, optim.MOMENTS)


def test_a_run_needs_keep_last_plus_one_checkpoints_and_its_metrics():
    one = 10 << 20
    rows = sizing.logged_rows(total_steps=100, log_every=10, eval_every=50, has_eval=True)
    # an upper bound: a train row every log_every steps and at the last; eval rows at step 0, every
    # eval_every steps and at the last
    assert rows == (10 + 1) + (2 + 2)
    need = sizing.run_bytes(one, keep_last=3, rows=rows)
    assert need == 4 * one + rows * sizing.METRICS_ROW_BYTES + sizing.PLOT_BYTES
    # resuming a run with 3 checkpoints on disk: one more is written before the oldest goes
    assert sizing.run_bytes(one, keep_last=3, rows=0, existing=3) == one + sizing.PLOT_BYTES
