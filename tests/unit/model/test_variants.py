"""Adapter variants (model/variants.py): PiSSA/OLoRA's residual base rebuilt on resume, their conversion to a
plain LoRA of the original base checked against PEFT's own `save_pretrained` conversion and against the
training model's logits, LoRA+'s optimizer groups, and DoRA's magnitudes in the parameter count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from dstrain.config.run import LoraConfig, ModelConfig
from dstrain.model import memory, variants
from dstrain.model.build import build_model, count_parameters, load_base_model
from tests.helpers import assert_adapter_logits, ulps_at_largest

INPUT = torch.randint(5, 2000, (2, 16), generator=torch.Generator().manual_seed(7))


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **kwargs})


def built(init: bool | str, model: ModelConfig | None = None, initial=None, **kwargs):
    torch.manual_seed(0)  # pissa_niter_K draws its random projection here, as a run after seed_everything
    return build_model(model or ModelConfig(), lora(init_lora_weights=init, **kwargs), 2, initial=initial)


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in peft_model.state_dict().items() if "lora_" not in k}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality; packed 4-bit weights stored in fp32 hold NaN bit patterns, which torch.equal
    never calls equal."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def train_a_little(peft_model) -> None:
    """Stand-in for training: every adapter tensor moves (B off its start, magnitudes too)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in (p for p in peft_model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_resume_rebuilds_the_residual_base_bitwise(init: str):
    fresh = built(init)
    initial = variants.initial_adapter(fresh)
    assert initial and all(variants.factor(k) for k in initial)
    original = base_weights(load_base_model(ModelConfig()))
    residual = base_weights(fresh)
    plain = {k: k.removeprefix("base_model.model.").replace(".base_layer", "") for k in residual}
    changed = [k for k in residual if not torch.equal(residual[k], original[plain[k]])]
    assert changed and all(".base_layer." in k for k in changed)  # the adapted weights, nothing else

    rebuilt = built(init, initial=initial)
    again = base_weights(rebuilt)
    assert [k for k in residual if not same_bits(residual[k], again[k])] == []
    assert variants.initial_adapter(rebuilt) is initial


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_decomposition_is_peft_s_own(init: str):
    """In fp32 dstrain's build gives what get_peft_model(init_lora_weights=...) gives: residual and factors."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    ours = built(init)
    peft_cfg = PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=init
    )
    theirs = get_peft_model(load_base_model(ModelConfig()), peft_cfg)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not same_bits(a[k], b[k])] == []


def test_a_resume_rebuilds_a_bf16_residual_bitwise():
    """get_peft_model would keep A0/B0 rounded to bf16 after subtracting them unrounded; dstrain keeps what
    it subtracted, so the rebuilt residual is the first one in bf16 too."""
    cfg = ModelConfig(dtype="bf16")
    fresh = built("pissa", cfg)
    rebuilt = built("pissa", cfg, initial=variants.initial_adapter(fresh))
    residual, again = base_weights(fresh), base_weights(rebuilt)
    assert [k for k in residual if not same_bits(residual[k], again[k])] == []


def test_a_resume_rebuilds_a_4bit_olora_residual_bitwise():
    cfg = ModelConfig(load_in_4bit=True)
    fresh = built("olora", cfg)
    rebuilt = built("olora", cfg, initial=variants.initial_adapter(fresh))
    residual, again = base_weights(fresh), base_weights(rebuilt)
    assert [k for k in residual if not same_bits(residual[k], again[k])] == []


def test_the_conversion_is_peft_s_own(tmp_path: Path):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) writes the same tensors and
    config as the conversion a checkpoint gets."""
    model = built("pissa")
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the start as a plain init
    model.save_pretrained(str(tmp_path / "init"))
    model.peft_config["default"].init_lora_weights = "pissa"
    train_a_little(model)
    model.save_pretrained(
        str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )

    ours = variants.plain_lora_state(get_peft_model_state_dict(model), variants.initial_adapter(model))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    model.peft_config["default"].save_pretrained(str(tmp_path / "ours"))
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    want = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    converted = variants.plain_lora_config(raw)
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "use_dora"):
        assert converted[key] == want[key], key


@pytest.mark.parametrize(
    "settings",
    [
        {"init": "pissa", "use_dora": True},
        {"init": "olora", "use_rslora": True},
        {"init": "pissa_niter_2", "use_rslora": True, "use_dora": True},
    ],
    ids=["pissa+dora", "olora+rslora", "pissa_niter+rslora+dora"],
)
def test_the_converted_adapter_on_the_original_base_gives_the_training_logits(tmp_path: Path, settings):
    init = settings.pop("init")
    model = built(init, **settings)
    train_a_little(model)
    expected = logits(model)
    state = variants.plain_lora_state(get_peft_model_state_dict(model), variants.initial_adapter(model))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(variants.plain_lora_config(raw)))

    loaded = PeftModel.from_pretrained(load_base_model(ModelConfig()), str(tmp_path)).eval()
    assert_adapter_logits(logits(loaded), expected, ulps_at_largest(expected, 64))
    # the checkpoint's second halves give back the initial adapter exactly
    recovered = variants.initial_from_plain_lora(state)
    initial = variants.initial_adapter(model)
    assert recovered.keys() == initial.keys()
    assert [k for k in initial if not torch.equal(recovered[k], initial[k])] == []


def test_loraplus_puts_lora_b_and_the_magnitudes_in_the_second_group():
    model = built(True, use_dora=True)
    named = list(model.named_parameters())
    groups = variants.optimizer_groups(named, lr=2e-4, ratio=16.0)
    slow, fast = groups
    assert fast["lr"] == 2e-4 * 16 and "lr" not in slow
    names = {id(p): n for n, p in named}
    assert {names[id(p)].split(".")[-3] for p in fast["params"]} == {"lora_B", "lora_magnitude_vector"}
    assert {names[id(p)].split(".")[-3] for p in slow["params"]} == {"lora_A"}
    assert len(slow["params"]) + len(fast["params"]) == sum(p.requires_grad for _, p in named)
    plain = variants.optimizer_groups(named, lr=2e-4, ratio=None)
    assert [id(p) for p in plain] == [id(p) for _, p in named if p.requires_grad]


def test_dora_magnitudes_are_counted_as_trainable():
    plain, _ = count_parameters(built(True))
    dora = built(True, use_dora=True)
    with_dora, _ = count_parameters(dora)
    out_features = sum(m.get_base_layer().out_features for _, m in variants.lora_layers(dora))
    assert with_dora == plain + out_features


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_memory_estimate_counts_what_dora_saves_for_backward(dropout: float):
    """Bytes autograd saves for one DoRA layer (parameters excluded) against the estimate's formula, as
    test_memory does for plain LoRA; the magnitudes count as trainable, the weight norm as a transient."""
    model = built(True, use_dora=True, dropout=dropout)
    layer = model.get_base_model().get_decoder().layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (ptr := t.untyped_storage().data_ptr()) not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    micro, seq = 2, 128
    x = torch.randn(micro, seq, 128, requires_grad=True)
    position = model.get_base_model().model.rotary_emb(x, torch.arange(seq).unsqueeze(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=position, attention_mask=None).sum()
    shape = memory.model_shape(model)
    assert shape.trainable_numel == count_parameters(model)[0]
    assert shape.dora_outputs == 128 + 64 + 64 + 128 + 344 + 344 + 128  # q k v o gate up down
    setup = memory.Setup(2, 1, micro, seq, 4, False, dropout > 0, False, 1024)
    # the measurement also sees each linear's eye(in) of the weight norm, freed before backward
    assert memory.layer_activation_bytes(shape, setup) == pytest.approx(sum(saved.values()), rel=0.2)
    assert shape.dora_workspace == 344 * 344 + 3 * 344 * 128  # down_proj: the widest input
    assert "DoRA weight norm (transient)" in {t.name for t in memory.estimate(shape, setup)}


def test_the_start_up_line_names_the_variant():
    assert variants.describe(lora()) == "LoRA r=4"
    every = lora(use_dora=True, use_rslora=True, init_lora_weights="pissa_niter_4", loraplus_lr_ratio=16.0)
    assert variants.describe(every) == "DoRA r=4, rsLoRA, pissa_niter_4 init, LoRA+ x16"
