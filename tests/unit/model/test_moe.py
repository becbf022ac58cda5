"""moe.py against transformers' own MoE causal LMs: the auxiliary loss their forward adds, the routers and
blocks found without a family list, and nothing of it on a dense model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dstrain.model import moe
from tests.families import family_config

COEF = 0.02  # not the config's 0.001: the model's own loss must use the same weight (set on the model)


def tiny(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(name), dtype=torch.float32).eval()
    model.router_aux_loss_coef = COEF
    return model


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, the second right-padded by 5: padding must not count in the balance."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 2048, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 3
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_aux_loss_is_the_models_own(name: str):
    model = tiny(name)
    ids, mask, labels = padded_batch()
    coef = moe.aux_coef(model, COEF)
    kwargs = moe.decoder_kwargs(model, coef)
    assert kwargs == {"output_router_logits": True}
    with torch.no_grad():
        decoder_out = model.get_decoder()(input_ids=ids, attention_mask=mask, **kwargs)
        ours = moe.aux_loss(model, decoder_out, mask)
        full = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        plain = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False).loss
    assert ours is not None and len(decoder_out.router_logits) == 2
    torch.testing.assert_close(coef * ours, coef * full.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(coef * ours, full.loss - plain, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ours, moe.aux_loss(model, decoder_out, None))  # the mask mattered


def test_aux_coef_defaults_to_the_model_config():
    model = tiny("qwen3_moe")
    assert moe.aux_coef(model, None) == pytest.approx(model.config.router_aux_loss_coef)
    assert moe.aux_coef(model, 0.5) == 0.5
    assert moe.decoder_kwargs(model, 0.0) == {}


def test_a_packed_4d_mask_is_not_read_as_padding():
    model = tiny("mixtral")
    ids, _, _ = padded_batch()
    with torch.no_grad():
        out = model.get_decoder()(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(
        moe.aux_loss(model, out, torch.ones(2, 1, 12, 12)), moe.aux_loss(model, out, None)
    )


def test_deepseek_v2_has_no_balancing_loss():
    """Its transformers port adds no auxiliary loss (routing is balanced by its group top-k): none here."""
    model = tiny("deepseek_v2")
    assert moe.is_moe(model)
    assert moe.aux_coef(model, 0.01) == 0.0 and moe.decoder_kwargs(model, 0.01) == {}
    with torch.no_grad():
        out = model.get_decoder()(input_ids=padded_batch()[0], output_router_logits=True)
    assert moe.aux_loss(model, out, None) is None


def test_a_dense_model_has_no_moe():
    model = AutoModelForCausalLM.from_config(family_config("llama"))
    assert not moe.is_moe(model)
    assert moe.aux_coef(model, 0.01) == 0.0 and moe.decoder_kwargs(model, 0.01) == {}
    assert moe.router_modules(model) == [] and moe.block_classes(model) == []
    assert moe.register_leaf_modules(model) == []


@pytest.mark.parametrize(
    ("name", "block", "router"),
    [
        ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter"),
        ("mixtral", "MixtralSparseMoeBlock", "MixtralTopKRouter"),
        ("deepseek_v2", "DeepseekV2Moe", "DeepseekV2TopkRouter"),
    ],
)
def test_blocks_and_routers_are_found(name: str, block: str, router: str):
    model = tiny(name)
    modules = dict(model.named_modules())
    routers = moe.router_modules(model)
    assert routers and {type(modules[n]).__name__ for n in routers} == {router}
    assert moe.register_leaf_modules(model) == [block]
    leaves = [n for n, m in model.named_modules() if getattr(m, "_z3_leaf", False)]
    assert leaves and all(type(modules[n]).__name__ == block for n in leaves)


def test_moe_config_keys_are_checked():
    from dstrain.config.run import config_from_dict
    from dstrain.errors import ConfigError

    raw = {
        "data": {"train": ["x.jsonl"]},
        "model": {"router_aux_loss_coef": -0.1},
        "lora": {"target_parameters": ["mlp.experts.gate_up_proj", " "]},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    problems = "\n".join(err.value.problems)
    assert "model.router_aux_loss_coef: must be >= 0" in problems
    assert "lora.target_parameters: names of 3-D expert parameters" in problems
    assert "set lora.dropout=0" in problems  # PEFT's ParamWrapper takes no dropout (the default is 0.05)
    raw["model"]["router_aux_loss_coef"], raw["lora"] = 0, {"target_parameters": ["x"], "dropout": 0.0}
    assert config_from_dict(raw).model.router_aux_loss_coef == 0.0
