"""The adapter-variant keys (lora.use_dora, use_rslora, init_lora_weights, loraplus_lr_ratio): what is refused,
with one message each, and LoRA+'s per-group LR schedule in the resolved ZeRO JSON."""

from __future__ import annotations

import pytest

from dstrain.config.run import config_from_dict
from dstrain.errors import ConfigError


def raw(lora: dict, **sections) -> dict:
    out = {"data": {"train": ["unused.jsonl"]}, "lora": lora}
    out.update(sections)
    return out


def problems(lora: dict, **sections) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw(lora, **sections))
    return info.value.problems


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_4", "olora"])
def test_peft_s_inits_are_accepted(init):
    cfg = config_from_dict(raw({"init_lora_weights": init, "use_dora": True, "use_rslora": True}))
    assert cfg.lora.init_lora_weights == init and cfg.lora.use_dora and cfg.lora.use_rslora


@pytest.mark.parametrize(
    ("lora", "sections", "needle"),
    [
        ({"init_lora_weights": "corda"}, {}, "'corda' is not one of true, false, gaussian, pissa"),
        ({"init_lora_weights": "pissa_niter_0"}, {}, "pissa_niter_K (K >= 1"),
        ({"init_lora_weights": "loftq"}, {}, "loftq is not supported"),
        ({"init_lora_weights": "pissa"}, {"model": {"load_in_4bit": True}}, "PEFT refuses it on 4-bit"),
        (
            {"use_dora": True, "target_parameters": ["mlp.experts.down_proj"], "dropout": 0.0},
            {},
            "plain LoRA",
        ),
        ({"loraplus_lr_ratio": 0}, {}, "lora.loraplus_lr_ratio: must be > 0"),
        (
            {"init_lora_weights": "olora"},
            {"data": {"train": ["u.jsonl"], "format": "preference"}},
            "no longer the original model",
        ),
    ],
    ids=["unknown", "niter-0", "loftq", "pissa-4bit", "dora-experts", "ratio-0", "olora-preference"],
)
def test_what_peft_or_dstrain_cannot_run_is_one_config_error(lora, sections, needle):
    (problem,) = problems(lora, **sections)
    assert needle in problem, problem


def test_olora_and_dora_are_accepted_with_4bit():
    cfg = config_from_dict(
        raw({"init_lora_weights": "olora", "use_dora": True}, model={"load_in_4bit": True})
    )
    assert cfg.model.load_in_4bit
