"""dstrain.engine's optimizer choice: torch AdamW as DeepSpeed's client optimizer where DeepSpeed's own Adam
brings nothing, and the same numbers as DeepSpeed's FusedAdam to fp32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from dstrain import engine

ADAMW = {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}


def ds(optimizer: dict | None = None, offload: str | None = None) -> dict:
    zero: dict = {"stage": 2}
    if offload:
        zero["offload_optimizer"] = {"device": offload}
    return {"optimizer": copy.deepcopy(optimizer or ADAMW), "zero_optimization": zero}


def test_adamw_without_offload_runs_on_torch():
    assert engine.choose_optimizer(ds()) == engine.TORCH
    assert engine.choose_optimizer(ds({"type": "Adam", "params": {"lr": 1e-3}})) == engine.TORCH
    assert engine.choose_optimizer(ds(offload="none")) == engine.TORCH


def test_offload_and_unknown_settings_keep_deepspeeds_optimizer():
    assert engine.choose_optimizer(ds(offload="cpu")) == engine.DEEPSPEED
    assert engine.choose_optimizer(ds({"type": "Lamb", "params": {"lr": 1e-3}})) == engine.DEEPSPEED
    amsgrad = {"type": "AdamW", "params": {"lr": 1e-3, "amsgrad": True}}
    assert engine.choose_optimizer(ds(amsgrad)) == engine.DEEPSPEED


def test_a_resumed_run_keeps_the_recorded_implementation():
    assert engine.choose_optimizer(ds(), recorded=engine.DEEPSPEED) == engine.DEEPSPEED
    assert engine.choose_optimizer(ds(offload="cpu"), recorded=engine.TORCH) == engine.TORCH


def test_adam_without_decoupled_decay_is_torch_adam():
    spec = {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.1, "adam_w_mode": False}}
    opt = engine.torch_adamw(ds(spec))([torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0.1
    opt = engine.torch_adamw(ds())([torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is torch.optim.AdamW and opt.defaults["foreach"] and opt.defaults["lr"] == 2e-4


@pytest.mark.numerics
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_torch_adamw_matches_deepspeeds_fused_adam(weight_decay: float, monkeypatch):
    """Twenty steps on the same gradients: equal to fp32 rounding (a few ulps), not bitwise."""
    from deepspeed.ops.adam import FusedAdam

    from dstrain.distributed import buildlocks

    # the op cache dstrain's runs use (a run that resumed an old checkpoint built FusedAdam there already),
    # with its stale locks cleared as a run does: torch's default cache would compile the op a second time
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    buildlocks.clear_stale(buildlocks.use_install_cache())

    spec = copy.deepcopy(ADAMW)
    spec["params"]["weight_decay"] = weight_decay
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 8, generator=gen), torch.randn(8, generator=gen)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    torch_opt = engine.torch_adamw(ds(spec))(ours)
    fused = FusedAdam(theirs, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for _ in range(20):
        grads = [torch.randn(t.shape, generator=gen) for t in start]
        for params, opt in ((ours, torch_opt), (theirs, fused)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(a.detach(), start[0 if a.dim() == 2 else 1])  # it did move
    state_a, state_b = torch_opt.state[ours[0]], fused.state[theirs[0]]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-6)


def test_deepspeeds_torch_adam_switch_is_the_client_optimizer_too():
    spec = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    assert engine.choose_optimizer(ds(spec)) == engine.TORCH
    assert engine.optimizer_op(ds(spec), engine.DEEPSPEED) is None
    opt = engine.torch_adamw(ds(spec))([torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is torch.optim.AdamW
