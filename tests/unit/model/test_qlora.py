"""QLoRA (model.load_in_4bit): a real bitsandbytes NF4 base on CPU, checked against the layers' own quant
state, the full-precision model with the same weights, PEFT loading dstrain's saved adapter, and export."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import PeftModel
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from dstrain import engine
from dstrain.checkpoint.export import export_checkpoint
from dstrain.checkpoint.rng import capture_rng
from dstrain.checkpoint.save import Payload, RunFiles, write_checkpoint_dir
from dstrain.checkpoint.state import TrainerState
from dstrain.config.demo import asset
from dstrain.config.run import LoraConfig, ModelConfig, config_from_dict, dump_yaml
from dstrain.config.zero import resolve_ds_config
from dstrain.errors import ConfigError, DstrainError
from dstrain.eval.generation import greedy_answers
from dstrain.model.build import (
    DTYPES,
    build_model,
    count_parameters,
    load_base_model,
    load_random_init,
    model_dir,
    quant,
)
from dstrain.model.supervised import SupervisedLM
from tests.helpers import ulps_at_largest

LORA = LoraConfig(r=8, alpha=16, dropout=0.0)
# NF4 keeps 16 levels per 64-weight block: on the tiny model's real text the mean token loss moves by about
# 0.1% (measured: 4.3209 -> 4.3176 in fp32, 4.3210 -> 4.3160 in bf16). A broken quantisation (wrong block
# constants, a wrong layout) moves it by whole nats; 2% leaves room for other weights without letting one by.
LOSS_RTOL = 0.02
# Merged export vs PEFT's unmerged forward, both fp32 on the same unquantised weights: W + s*B@A rounded once
# against W@x + s*B@(A@x) changes the rounding in each of the 14 linear layers, and the norms, softmax and
# residual stream carry that on to the logits. Measured: 4.4e-5 and 4.8e-5 at max |logit| 23 (about 25
# ulps), and once 1.22e-4 at logits ~7 (about 256 ulps), which broke a fixed 1e-4. A bound in ulps of the
# largest logit follows the magnitude; 1024 of them (2e-3 at 23) stay >100x below what the adapter moves
# (asserted, so the bound cannot hide a merge that lost the adapter).
MERGE_ULPS = 1024
RELOAD_ULPS = 8


def qlora_cfg(dtype: str = "fp32", **changes: object) -> ModelConfig:
    return replace(ModelConfig(dtype=dtype, load_in_4bit=True), **changes)


def text_batch(tokenizer, n: int = 4) -> dict[str, torch.Tensor]:
    """Real text: the first records of the bundled RAG set, prompt and answer, right-padded."""
    lines = Path(asset("data", "sft_rag_train.jsonl")).read_text(encoding="utf-8").splitlines()[:n]
    records = [json.loads(line) for line in lines]
    texts = [
        " ".join(r["retrieval_result"]) + f" Question: {r['query']} Answer: {r['answer']}" for r in records
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def lora_layers(model: PeftModel) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_linear_layers_are_nf4_double_quant_in_the_compute_dtype(dtype):
    model = build_model(qlora_cfg(dtype), LORA, zero_stage=2)
    layers = lora_layers(model)
    assert len(layers) == 2 * 7  # all-linear: q k v o gate up down in both decoder layers
    for layer in layers:
        base = layer.base_layer
        assert isinstance(base, bnb.nn.Linear4bit)
        state = base.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested and state.state2 is not None  # double quantisation of the absmax constants
        assert base.compute_dtype == DTYPES[dtype]
        assert base.weight.dtype == DTYPES[dtype]  # bnb_4bit_quant_storage = compute dtype (ZeRO-3)
    head = model.get_base_model().get_output_embeddings()
    assert type(head) is torch.nn.Linear  # the output head stays full precision and gets no LoRA
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_parameter_count_is_the_real_one_and_4bit_weights_are_smaller():
    q_model = build_model(qlora_cfg("bf16"), LORA, zero_stage=2)
    full = build_model(ModelConfig(dtype="bf16"), LORA, zero_stage=2)
    assert count_parameters(q_model) == count_parameters(full)  # not the packed storage elements
    trainable, _ = count_parameters(q_model)
    assert trainable == sum(p.numel() for n, p in q_model.named_parameters() if "lora_" in n)
    q_linear = sum(quant.weight_bytes(layer.base_layer) for layer in lora_layers(q_model))
    full_linear = sum(quant.weight_bytes(layer.base_layer) for layer in lora_layers(full))
    # 4 bits per weight + one 8-bit absmax per 64 weights (+ a little) against 16 bits
    assert q_linear < 0.3 * full_linear


@pytest.mark.parametrize("reentrant", [False, True], ids=["zero2", "zero3-reentrant"])
def test_forward_backward_gives_finite_grads_on_lora_only(tokenizer, reentrant):
    cfg = qlora_cfg("fp32", gradient_checkpointing=True)
    model = build_model(cfg, LORA, zero_stage=3 if reentrant else 2)
    assert model.get_base_model().is_gradient_checkpointing
    module = SupervisedLM(model).train()
    nll, count = module(**text_batch(tokenizer))
    (nll / count).backward()
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert param.grad is None, name
            continue
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if "lora_B" in name:  # lora_A's gradient is zero at init (lora_B starts at zero)
            assert param.grad.abs().sum() > 0, name


def test_4bit_loss_is_close_to_the_full_precision_loss(tokenizer):
    batch = text_batch(tokenizer)
    with torch.no_grad():
        full = load_base_model(ModelConfig(dtype="fp32"))(**batch).loss.item()
        quantised = load_base_model(qlora_cfg("fp32"))(**batch).loss.item()
    assert quantised != full  # it really is quantised
    assert abs(quantised - full) < LOSS_RTOL * full, (quantised, full)


def train_a_little(model: PeftModel, batch: dict[str, torch.Tensor], steps: int = 3) -> None:
    """A few plain SGD steps so that lora_B is no longer zero and the adapter changes the logits."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


def save_like_a_run(model: PeftModel, cfg_dict: dict, out: Path) -> Path:
    """dstrain's checkpoint writer on the trained adapter, as rank 0 writes it after the gather."""
    full = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    tensors, meta = capture_rng()
    payload = Payload(
        adapter=engine.adapter_state(model, full),
        optimizer={},
        scheduler={},
        rng=[save(tensors, metadata=meta)],
    )
    cfg = config_from_dict(cfg_dict)
    ckpt = out / "checkpoints" / "step-00000003"
    ckpt.mkdir(parents=True)
    write_checkpoint_dir(ckpt, payload, model, TrainerState(step=3), RunFiles(dump_yaml(cfg), {}, {}))
    return ckpt


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, tokenizer):
    """A QLoRA (fp32 compute) model trained a few steps and saved in dstrain's checkpoint layout."""
    out = tmp_path_factory.mktemp("qlora")
    cfg = qlora_cfg("fp32")
    model = build_model(cfg, LORA, zero_stage=2)
    batch = text_batch(tokenizer)
    train_a_little(model, batch)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    raw = {
        "model": {"path": cfg.path, "dtype": cfg.dtype, "load_in_4bit": True},
        "lora": {"r": LORA.r, "alpha": LORA.alpha, "dropout": LORA.dropout},
        "data": {"train": ["unused.jsonl"]},
    }
    return save_like_a_run(model, raw, out), batch, logits


@pytest.mark.numerics
def test_saved_adapter_loads_in_peft_on_a_fresh_4bit_base_and_reproduces_logits(trained_checkpoint):
    ckpt, batch, logits = trained_checkpoint
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in ckpt.iterdir()}
    # the builtin's own dir, whatever dir transformers loaded the 4-bit base from
    named = json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(model_dir(qlora_cfg("fp32")))
    reloaded = PeftModel.from_pretrained(load_base_model(qlora_cfg("fp32")), str(ckpt)).eval()
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with reloaded.disable_adapter():
            base = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The same packed 4-bit bytes and fp32 LoRA values through the same kernels: identical (measured: a max
    # difference of 0.0). A few ulps of the largest logit (~23) leave room for another summation order only.
    tolerance = ulps_at_largest(logits, RELOAD_ULPS)
    torch.testing.assert_close(again, logits, rtol=0, atol=tolerance)
    assert (base - logits).abs().max().item() > 1000 * tolerance  # the adapter matters


@pytest.mark.numerics
def test_merged_export_folds_the_adapter_into_the_unquantised_base(trained_checkpoint, tmp_path):
    ckpt, batch, _ = trained_checkpoint
    used, notes = export_checkpoint(ckpt, tmp_path / "merged", merge=True)
    assert used == ckpt
    assert any("un-quantised" in note for note in notes)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not quant.is_quantized(merged)
    assert all(type(m) is not bnb.nn.Linear4bit for m in merged.modules())
    # the reference: the same adapter on the full-precision base, unmerged (PEFT's own forward)
    reference = PeftModel.from_pretrained(load_base_model(ModelConfig(dtype="fp32")), str(ckpt)).eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = reference(**inputs).logits
        got = merged(**inputs).logits
        with reference.disable_adapter():
            base = reference(**inputs).logits
    tolerance = ulps_at_largest(want, MERGE_ULPS)
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    # a merge that dropped, doubled or mis-scaled the adapter would move the logits by about this much
    assert (base - want).abs().max().item() > 100 * tolerance


def test_generation_and_eval_mode_run_on_a_4bit_base(tokenizer):
    """Greedy decoding (eval mode, no grad) on CPU, then training again: the 4-bit weights keep the
    training layout (bitsandbytes' CPU inference repacking is off) and backward still reaches LoRA."""
    model = build_model(qlora_cfg("fp32"), LORA, zero_stage=2)
    prompts = [tokenizer("Question: Where does the river Diazei end? Answer:")["input_ids"]]
    model.eval()
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=4, synced=False)
    assert len(answers) == 1 and isinstance(answers[0], str)
    model.train()
    batch = text_batch(tokenizer, n=2)
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_random_init_builtin_is_quantised_from_the_same_weights(tmp_path):
    """A builtin without weights (random init from model.init_seed) in 4-bit: the dequantised weights are
    the NF4 rounding of exactly the unquantised random init."""
    (tmp_path / "config.json").write_text((model_dir(ModelConfig()) / "config.json").read_text())
    kwargs = {"trust_remote_code": False, "attn_implementation": "sdpa"}
    dense = load_random_init(tmp_path, ModelConfig(init_seed=7), kwargs)
    quantised = load_random_init(tmp_path, qlora_cfg("fp32", init_seed=7), kwargs)
    q_proj = quantised.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    weight = dense.model.layers[0].self_attn.q_proj.weight
    restored = dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
    err = (restored - weight).abs().max().item()
    assert 0 < err < 0.25 * weight.abs().max().item()
    assert torch.equal(quantised.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_zero_json_settings_that_requantise_weights_are_refused_with_4bit():
    cfg = config_from_dict({"model": {"load_in_4bit": True}, "data": {"train": ["x.jsonl"]}})
    raw = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 3, "zero_quantized_weights": True},
    }
    with pytest.raises(ConfigError) as caught:
        resolve_ds_config(raw, cfg, world=2, total_steps=10)
    assert any("zero_optimization.zero_quantized_weights" in p for p in caught.value.problems)
    plain = config_from_dict({"data": {"train": ["x.jsonl"]}})
    resolve_ds_config(raw, plain, world=2, total_steps=10)  # without 4-bit the key is DeepSpeed's business


def test_missing_bitsandbytes_is_one_clear_message(monkeypatch):
    """sys.modules[name] = None is how Python itself marks a module as not importable."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = config_from_dict({"model": {"load_in_4bit": True}, "data": {"train": ["x.jsonl"]}})
    raw = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    with pytest.raises(ConfigError) as caught:
        resolve_ds_config(raw, cfg, world=1, total_steps=10)
    assert [p for p in caught.value.problems if "pip install bitsandbytes" in p]
    with pytest.raises(DstrainError, match="pip install bitsandbytes"):
        load_base_model(cfg.model)
