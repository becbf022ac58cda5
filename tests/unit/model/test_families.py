"""Logit transforms in the chunked head (against plain autograd), the path each model takes, the self-check."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from dstrain.errors import ConfigError
from dstrain.model import families
from dstrain.model.families import PLAIN, LogitTransform, choose_path
from dstrain.model.head import target_logps
from dstrain.model.selfcheck import spread, tolerance, verdict
from dstrain.model.supervised import SupervisedLM
from tests.families import family_config
from tests.numerics import assert_tensors_close

TRANSFORMS = [
    PLAIN,
    LogitTransform(hidden_scale=0.25),
    LogitTransform(logit_scale=0.125),
    LogitTransform(softcap=2.0),
    LogitTransform(hidden_scale=0.5, logit_scale=3.0, softcap=1.5),
]


def reference_logps(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, t: LogitTransform):
    """Plain autograd through the full logits: the definition the chunked function must equal."""
    logits = (hidden * t.hidden_scale) @ weight.T * t.logit_scale
    if t.softcap is not None:
        logits = t.softcap * torch.tanh(logits / t.softcap)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.describe())
@pytest.mark.parametrize("chunk", [3, 64])  # several chunks (recomputed in backward) and one (kept)
def test_chunked_head_applies_the_transform_forward_and_backward(transform, chunk):
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=False).requires_grad_(False)
    head.weight.mul_(6)  # logits of several units, so soft-capping bends them
    hidden = torch.randn(10, 8, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, 50, (10,))
    upstream = torch.randn(10)

    got = target_logps(head, hidden, targets, chunk, transform)
    (grad_got,) = torch.autograd.grad(got, hidden, upstream)
    want = reference_logps(head.weight, hidden, targets, transform)
    (grad_want,) = torch.autograd.grad(want, hidden, upstream)

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)
    if transform is not PLAIN:  # the transform mattered: the bare head gives other numbers
        assert not torch.allclose(target_logps(head, hidden, targets, chunk), want, atol=1e-3)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama", PLAIN),
        ("gemma2", LogitTransform(softcap=30.0)),
        ("gemma3_text", PLAIN),
        ("gemma3_text-softcap", LogitTransform(softcap=30.0)),
        ("granite", LogitTransform(logit_scale=1 / 8)),
        ("cohere", LogitTransform(logit_scale=0.0625)),
        ("minicpm3", LogitTransform(hidden_scale=16 / 64)),
    ],
)
def test_each_family_reads_its_transform_from_its_config(name, expected):
    model = AutoModelForCausalLM.from_config(family_config(name))
    path = choose_path(model, "auto")
    assert path.kind == "chunked" and path.transform == expected
    assert type(model).__name__ in path.reason


def test_an_unknown_family_takes_the_exact_path_unless_forced():
    model = AutoModelForCausalLM.from_config(family_config("llama"))
    model.config.model_type = "somebody-new"
    auto = choose_path(model, "auto")
    assert auto.kind == "exact" and "'somebody-new'" in auto.describe()
    assert choose_path(model, "chunked").kind == "chunked"
    assert choose_path(AutoModelForCausalLM.from_config(family_config("llama")), "exact").kind == "exact"


def granite_lm() -> SupervisedLM:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(family_config("granite"))
    peft = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return SupervisedLM(peft.eval(), logits_chunk_tokens=5)


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 2048, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_self_check_passes_on_the_right_head_and_names_the_model_on_a_wrong_one(monkeypatch):
    diff, rows, largest, count = granite_lm()(**batch(), check=True)
    assert int(count) == 16 and float(diff) < tolerance(torch.float32, float(largest))
    assert float(rows) == 0.0  # padded rows: the batch is each record's own row
    verdict(float(diff), float(largest), int(count), torch.float32, "GraniteForCausalLM")

    monkeypatch.setitem(families.FAMILIES, "granite", families._plain)  # a table that forgot the scale
    diff, _, largest, count = granite_lm()(**batch(), check=True)
    with pytest.raises(ConfigError) as err:
        verdict(float(diff), float(largest), int(count), torch.float32, "GraniteForCausalLM")
    message = str(err.value)
    assert "GraniteForCausalLM" in message and "model.head: exact" in message


def test_self_check_with_no_supervised_positions_still_runs_and_passes():
    empty = batch()
    empty["labels"][:] = -100
    diff, _, _, count = granite_lm()(**empty, check=True)
    assert int(count) == 0 and float(diff) == 0.0
    verdict(0.0, 0.0, 0, torch.float32, "GraniteForCausalLM")


@pytest.mark.numerics
def test_exact_path_gives_the_chunked_heads_loss_and_gradients():
    lm = granite_lm()
    exact = SupervisedLM(lm.peft_model, head="exact")
    results = []
    for module in (lm, exact):
        module.peft_model.zero_grad()
        nll, n = module(**batch())
        (nll / n).backward()
        grads = [p.grad.clone() for p in module.peft_model.parameters() if p.requires_grad]
        results.append((nll.detach(), torch.cat([g.flatten() for g in grads])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    # the gradients as a whole, by norm: an entry near zero carries the rounding of what cancelled into it
    assert_tensors_close(results[1][1], results[0][1], 1e-5, "exact path vs chunked head: LoRA gradients")


def test_spread_picks_first_last_and_between():
    assert spread(3, 16).tolist() == [0, 1, 2]
    picked = spread(100, 5).tolist()
    assert picked[0] == 0 and picked[-1] == 99 and len(set(picked)) == 5
