"""QLoRA in real 2-rank DeepSpeed jobs (started by torchrun, gloo on CPU): a 4-bit NF4 base with gradient
checkpointing under ZeRO-2 (fp32 compute) and ZeRO-3 (bf16 compute and storage: the QLoRA + ZeRO-3 setup).

Each run trains a few steps and saves; the saved adapter must be non-empty (not ZeRO-3's [0]-shaped
partitions) and, loaded by PEFT onto a freshly quantised base, reproduce the logits of the model that was
training (recorded by probe_logits.py after training).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from dstrain.checkpoint.layout import read_latest, verify_checkpoint
from dstrain.config.run import ModelConfig
from dstrain.config.zero import find_ds_config
from dstrain.model.build import DTYPES, load_base_model
from tests.helpers import (
    REPO,
    assert_adapter_logits,
    check,
    run,
    torchrun_cmd,
    train_losses,
    ulps_at_largest,
    write_config,
)

pytestmark = pytest.mark.distributed

STEPS = 4
# A learning rate high enough that 4 steps move the loss and the logits well past bf16 rounding.
LR = 1e-2
# Reloaded adapter vs the live model: the same packed 4-bit bytes and LoRA values (cast to the run's dtype
# as DeepSpeed holds them); only summation order may differ between a partitioned and a dense forward
# (measured: identical logits for both). Allowed: a few ulps of the largest logit in the compute dtype, so
# the bound follows the logits' magnitude (fp32: 8 ulps, 1.5e-5 at ~20; bf16 logits of magnitude ~20 step by
# 0.125: two steps).
LOGITS_ULPS = {"fp32": 8, "bf16": 2}
# The trained adapter moves the logits by ~2.6 at most (measured, both runs); the base alone must differ.
ADAPTER_EFFECT = 1.0


def zero_json(tmp_path: Path, name: str) -> Path:
    """A shipped ZeRO JSON with a higher learning rate."""
    ds = json.loads(find_ds_config(f"ds_configs/{name}").read_text())
    ds["optimizer"]["params"]["lr"] = LR
    path = tmp_path / name
    path.write_text(json.dumps(ds))
    return path


def reload_adapter(ckpt: Path, dtype: str) -> PeftModel:
    """PEFT's own loading onto a fresh 4-bit base, LoRA weights cast to the run's compute dtype."""
    base = load_base_model(ModelConfig(dtype=dtype, load_in_4bit=True))
    model = PeftModel.from_pretrained(base, str(ckpt)).eval()
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(DTYPES[dtype])
    return model


@pytest.mark.parametrize(("ds_config", "dtype"), [("zero2.json", "fp32"), ("zero3.json", "bf16")])
def test_qlora_with_checkpointing_trains_and_saves_a_loadable_adapter(tmp_path, small_data, ds_config, dtype):
    config = write_config(
        tmp_path,
        small_data,
        model={"dtype": dtype, "load_in_4bit": True, "gradient_checkpointing": True},
        data={"eval": []},
        ds_config=str(zero_json(tmp_path, ds_config)),
        train={"max_steps": STEPS, "save_every": STEPS},
    )
    proc = check(
        run(
            torchrun_cmd(str(REPO / "tests" / "distributed" / "probe_logits.py"), "--config", str(config)),
            tmp_path,
        )
    )
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "run"
    losses = train_losses(run_dir)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert len(set(losses)) > 1, "the loss never changed"

    ckpt = run_dir / "checkpoints" / read_latest(run_dir / "checkpoints")
    assert ckpt.name == f"step-{STEPS:08d}" and verify_checkpoint(ckpt) == []
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 and t.dim() == 2 for t in adapter.values()), (
        "empty or [0]-shaped adapter"
    )
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k), "lora_B still zero"

    probe = load_file(str(run_dir / "probe_logits.safetensors"))
    inputs = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    model = reload_adapter(ckpt, dtype)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        with model.disable_adapter():
            base_logits = model(**inputs).logits.float()
    tolerance = ulps_at_largest(probe["logits"], LOGITS_ULPS[dtype], DTYPES[dtype])
    assert_adapter_logits(logits, probe["logits"], tolerance)
    assert (base_logits - probe["logits"]).abs().max().item() > ADAPTER_EFFECT
