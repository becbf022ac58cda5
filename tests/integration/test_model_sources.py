"""Models from a local HF directory (the way real runs load them), in bf16 and with gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dstrain.config.run import ModelConfig
from dstrain.model.build import load_base_model, load_tokenizer
from tests.helpers import check, metrics, train_single, write_config


@pytest.fixture
def local_model(tmp_path):
    path = tmp_path / "my-model"
    load_base_model(ModelConfig()).save_pretrained(path)
    load_tokenizer(ModelConfig()).save_pretrained(path)
    return path


def test_local_model_dir_bf16_with_gradient_checkpointing(tmp_path, small_data, local_model, monkeypatch):
    # model.path relative to the directory the run starts in, as users often write it
    model = {"path": local_model.name, "dtype": "bf16", "gradient_checkpointing": True}
    config = write_config(tmp_path, small_data, model=model, train={"max_steps": 3, "save_every": 0})
    check(train_single(config, cwd=tmp_path))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(
        torch.isfinite(torch.tensor(r["loss"])) for r in rows
    )
    resolved = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    # fp32 master weights are saved, not the bf16 copies the forward used
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    # named absolute, so PEFT finds the base from any directory (a relative name would send it to the Hub)
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        local_model
    )
    monkeypatch.chdir(tmp_path / "run")
    probe = torch.randint(7, 2000, (2, 16), generator=torch.Generator().manual_seed(3))
    auto = AutoPeftModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(local_model), dtype=torch.float32)
    explicit = PeftModel.from_pretrained(base, str(ckpt)).eval()
    with torch.no_grad():
        assert torch.equal(auto(input_ids=probe).logits, explicit(input_ids=probe).logits)


def test_local_dir_without_config_is_a_clear_error(tmp_path, small_data):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    config = write_config(tmp_path, small_data, model={"path": str(empty)})
    proc = train_single(config, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no config.json inside" in proc.stderr
