"""dstrain's preference losses against TRL 1.16's own code on identical log-probs.

TRL computes these losses inside trainer methods, not pure functions, so the tests call those methods
unbound (`DPOTrainer._compute_loss`, `CPOTrainer.get_batch_loss_metrics` / `cpo_loss`) on a trainer made
with `object.__new__` that carries only the attributes the methods read, and a stand-in model whose
outputs were built from the same numbers dstrain sees. Everything runs in float64 on CPU.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from dstrain.objectives.losses import PREFERENCE_OBJECTIVES, PreferenceTerms, preference_loss
from tests.unit.objectives.trl_stubs import SingleProcess, bare_trainer, paired_batch

# TRL is a test dependency (pyproject's [test] extra): a missing TRL fails here rather than skipping.
with warnings.catch_warnings():  # TRLExperimentalWarning: CPO lives under trl.experimental in 1.16
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer

TOL = dict(rtol=0.0, atol=1e-9)  # float64 on both sides: agreement is at rounding level (~1e-15)
B, T, V = 6, 12, 11  # pairs, sequence length (prompt + answer + padding), vocab of the logits path


class _FusedHeadLM:
    """Stands in for the policy under TRL's fused LM head: per-token log-probs [2B, T-1] of the next tokens,
    0 (and no gradient) where the label is -100, as the real head returns them."""

    def __init__(self, per_token_logps: torch.Tensor) -> None:
        self.per_token_logps = per_token_logps

    def __call__(self, *, input_ids, labels, fused_lm_head, **_) -> SimpleNamespace:
        assert fused_lm_head and labels.shape == input_ids.shape
        log_probs = self.per_token_logps * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(log_probs).detach()
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


class _LogitsLM:
    """Stands in for the policy of the CPO/SimPO path: returns fixed logits [2B, T, V]."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, input_ids, attention_mask, use_cache) -> SimpleNamespace:
        assert input_ids.shape == self.logits.shape[:2]
        return SimpleNamespace(logits=self.logits)


def _completion_mask(gen: torch.Generator) -> torch.Tensor:
    """[2B, T] mask of answer tokens (chosen rows, then rejected), of different lengths after a prompt of >= 1
    token, so TRL's unshifted `completion_mask.sum(1)` and the shifted mask's sum both equal the token count."""
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        start = int(torch.randint(1, 4, (1,), generator=gen))
        length = int(torch.randint(1, T - start + 1, (1,), generator=gen))
        mask[row, start : start + length] = 1
    return mask


def _pairs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random per-token policy log-probs (a grad leaf) and per-pair reference log-probs near the policy's."""
    gen = torch.Generator().manual_seed(seed)
    mask = _completion_mask(gen)
    shifted = mask[:, 1:].double()
    per_token = (-3.0 * torch.rand(2 * B, T - 1, generator=gen, dtype=torch.float64)).requires_grad_()
    policy = (per_token * shifted).sum(1)
    reference = policy.detach() + torch.randn(2 * B, generator=gen, dtype=torch.float64) * 2.0
    tokens = mask.sum(1)
    assert len(set(tokens.tolist())) > 2, "token counts should differ between rows"
    return {
        "mask": mask,
        "per_token": per_token,
        "pc": policy[:B],
        "pr": policy[B:],
        "rc": reference[:B],
        "rr": reference[B:],
        "tc": tokens[:B],
        "tr": tokens[B:],
    }


def _trl_dpo(data: dict, *, beta: float, loss_types: list[str], loss_weights: list[float] | None = None):
    """TRL's loss and logged metrics from `DPOTrainer._compute_loss`, precomputed-reference path."""
    trainer = bare_trainer(
        DPOTrainer,
        beta=beta,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        use_weighting=False,
        precompute_ref_logps=True,
    )
    inputs = {
        "input_ids": torch.zeros(2 * B, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
        "completion_mask": data["mask"],
        "ref_chosen_logps": data["rc"],
        "ref_rejected_logps": data["rr"],
    }
    loss = DPOTrainer._compute_loss(trainer, _FusedHeadLM(data["per_token"]), inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _ours(name: str, data: dict, **kwargs) -> PreferenceTerms:
    d = data
    return preference_loss(name, d["pc"], d["pr"], d["rc"], d["rr"], d["tc"], d["tr"], **kwargs)


def _assert_same(ours: PreferenceTerms, trl_loss: torch.Tensor, metrics: dict, leaf: torch.Tensor) -> None:
    """Same mean loss, same logged reward means, and the same gradient on the per-token log-probs."""
    torch.testing.assert_close(ours.loss.mean(), trl_loss, **TOL)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-9)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-9)
    (ours_grad,) = torch.autograd.grad(ours.loss.mean(), leaf, retain_graph=True)
    (trl_grad,) = torch.autograd.grad(trl_loss, leaf, retain_graph=True)
    torch.testing.assert_close(ours_grad, trl_grad, **TOL)
    assert ours_grad.abs().sum() > 0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_sigmoid(beta):
    """dpo (ε = 0) == trl/trainer/dpo_trainer.py DPOTrainer._compute_loss, loss_type=["sigmoid"]."""
    data = _pairs(seed=1)
    trl_loss, metrics = _trl_dpo(data, beta=beta, loss_types=["sigmoid"])
    _assert_same(_ours("dpo", data, beta=beta), trl_loss, metrics, data["per_token"])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl_ipo(beta):
    """ipo == DPOTrainer._compute_loss, loss_type=["ipo"] (log-ratios length-normalised by token counts)."""
    data = _pairs(seed=2)
    trl_loss, metrics = _trl_dpo(data, beta=beta, loss_types=["ipo"])
    _assert_same(_ours("ipo", data, beta=beta), trl_loss, metrics, data["per_token"])


@pytest.mark.parametrize("nll_weight", [1.0, 0.3])
def test_dpo_nll_matches_trl_sigmoid_plus_sft(nll_weight):
    """dpo_nll == DPOTrainer._compute_loss, loss_type=["sigmoid", "sft"], loss_weights=[1, nll_weight].

    TRL 1.16 has no `rpo_alpha`; its "sft" term is the chosen NLL averaged over all chosen tokens of the batch.
    """
    data = _pairs(seed=3)
    trl_loss, metrics = _trl_dpo(
        data, beta=0.2, loss_types=["sigmoid", "sft"], loss_weights=[1.0, nll_weight]
    )
    chosen_nll = -data["pc"] / data["tc"]  # per-pair mean NLL, what dstrain's callers pass
    ours = _ours("dpo_nll", data, beta=0.2, nll_weight=nll_weight, chosen_nll=chosen_nll)
    _assert_same(ours, trl_loss, metrics, data["per_token"])


def _simpo_batch(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A CPO-format batch (same length for both sides; answers of different lengths) and its logits leaf."""
    gen = torch.Generator().manual_seed(seed)
    mask = _completion_mask(gen)
    input_ids = torch.randint(1, V, (2 * B, T), generator=gen)
    labels = input_ids.masked_fill(mask == 0, -100)
    logits = (2.0 * torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)).requires_grad_()
    return paired_batch(input_ids, labels, torch.ones_like(input_ids), B), logits


@pytest.mark.parametrize(
    ("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (0.7, 1.3, 0.0), (2.0, 0.5, 0.1)]
)
def test_simpo_matches_trl_cpo_simpo(beta, gamma, label_smoothing):
    """simpo == trl/experimental/cpo/cpo_trainer.py CPOTrainer.get_batch_loss_metrics (-> concatenated_forward,
    get_batch_logps(average_log_prob=True), cpo_loss), loss_type="simpo", cpo_alpha=0 (pure SimPO)."""
    batch, logits = _simpo_batch(seed=4)
    trainer = bare_trainer(
        CPOTrainer,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        alpha=0.0,
        cpo_alpha=0.0,
        is_encoder_decoder=False,
        pad_token_id=0,
    )
    trl_loss, metrics = CPOTrainer.get_batch_loss_metrics(trainer, _LogitsLM(logits), batch)
    avg_c, avg_r = CPOTrainer.concatenated_forward(trainer, _LogitsLM(logits), batch)[:2]
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(trainer, avg_c, avg_r)

    # dstrain's inputs, computed independently: summed answer log-probs and token counts per row.
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    answer = labels != -100
    token_logps = (
        torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    )
    policy, tokens = (token_logps * answer).sum(1), answer.sum(1)
    junk_ref = torch.full((B,), 123.0, dtype=torch.float64)  # SimPO has no reference: must be ignored
    ours = preference_loss(
        "simpo",
        policy[:B],
        policy[B:],
        junk_ref,
        -junk_ref,
        tokens[:B],
        tokens[B:],
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
    )
    torch.testing.assert_close(ours.loss, trl_losses, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen_rewards, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected_rewards, **TOL)
    torch.testing.assert_close(ours.loss.mean(), trl_loss, **TOL)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-9)
    (ours_grad,) = torch.autograd.grad(ours.loss.mean(), logits, retain_graph=True)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    torch.testing.assert_close(ours_grad, trl_grad, **TOL)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_matches_trl_cpo_sigmoid_on_log_ratios(label_smoothing):
    """cDPO has no DPOTrainer counterpart in TRL 1.16: its "sigmoid" branch ignores label_smoothing, and
    "robust"/"aot" are different losses. CPOTrainer.cpo_loss, loss_type="sigmoid", computes
    -(1-ε)·logσ(β(a - b)) - ε·logσ(-β(a - b)) on the log-probs it is given; fed the log-ratios a = πc - rc,
    b = πr - rr, that is cDPO's formula term for term (its rewards β·a, β·b are DPO's)."""
    data = _pairs(seed=5)
    beta = 0.3
    trainer = SimpleNamespace(
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type="sigmoid",
        alpha=0.0,
        accelerator=SingleProcess(),
    )
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(
        trainer, data["pc"] - data["rc"], data["pr"] - data["rr"]
    )
    ours = _ours("dpo", data, beta=beta, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.loss, trl_losses, **TOL)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected, **TOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.25])
def test_cdpo_closed_form(label_smoothing):
    """Hand-derived: L(x) = -(1-ε)·log σ(x) - ε·log σ(-x) at x = βΔ, evaluated with `math`; its derivative
    σ(x) - (1 - ε) vanishes at x* = log((1-ε)/ε), so cDPO stops pushing once the margin reaches x*."""
    beta = 0.5
    deltas = [-3.0, -0.2, 0.0, 0.7, 4.0]
    pc = torch.tensor(deltas, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(len(deltas), dtype=torch.float64)
    ours = preference_loss(
        "dpo", pc, zero, zero, zero, zero + 1, zero + 1, beta=beta, label_smoothing=label_smoothing
    )
    eps = label_smoothing
    for got, delta in zip(ours.loss.tolist(), deltas, strict=True):
        x = beta * delta
        want = (1 - eps) * math.log1p(math.exp(-x)) + eps * math.log1p(math.exp(x))
        assert got == pytest.approx(want, abs=1e-12)
    (grad,) = torch.autograd.grad(ours.loss.sum(), pc)
    want_grad = [beta * (1 / (1 + math.exp(-beta * d)) - (1 - eps)) for d in deltas]
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), **TOL)
    if eps > 0:
        x_star = math.log((1 - eps) / eps)
        at_star = torch.tensor([x_star / beta], dtype=torch.float64, requires_grad=True)
        one = torch.zeros(1, dtype=torch.float64)
        loss = preference_loss(
            "dpo", at_star, one, one, one, one + 1, one + 1, beta=beta, label_smoothing=eps
        )
        (g,) = torch.autograd.grad(loss.loss.sum(), at_star)
        assert abs(g.item()) < 1e-12


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_at_reference_is_log2(label_smoothing):
    """Policy == reference: Δ = 0, so every pair's loss is log 2 and both rewards are 0."""
    data = _pairs(seed=6)
    terms = preference_loss(
        "dpo",
        data["pc"],
        data["pr"],
        data["pc"].detach().clone(),
        data["pr"].detach().clone(),
        data["tc"],
        data["tr"],
        beta=0.1,
        label_smoothing=label_smoothing,
    )
    log2 = torch.full((B,), math.log(2), dtype=torch.float64)
    if label_smoothing == 0.0:
        assert torch.equal(terms.loss, log2)  # bit-exact
    else:
        torch.testing.assert_close(terms.loss, log2, rtol=0, atol=1e-15)
    assert torch.equal(terms.chosen_rewards, torch.zeros(B, dtype=torch.float64))
    assert torch.equal(terms.rejected_rewards, torch.zeros(B, dtype=torch.float64))


@pytest.mark.parametrize("name", PREFERENCE_OBJECTIVES)
def test_gradients_reach_policy_only(name):
    """The loss trains the policy log-probs; the reference and the logged rewards carry no gradient."""
    gen = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (-10 * torch.rand(B, generator=gen, dtype=torch.float64) for _ in range(4))
    pc, pr, rc, rr = (t.requires_grad_() for t in (pc, pr, rc, rr))
    tc, tr = torch.randint(1, 9, (B,), generator=gen), torch.randint(1, 9, (B,), generator=gen)
    terms = preference_loss(name, pc, pr, rc, rr, tc, tr, beta=0.5, chosen_nll=-pc / tc)
    assert terms.loss.shape == terms.chosen_rewards.shape == terms.rejected_rewards.shape == (B,)
    assert not terms.chosen_rewards.requires_grad and not terms.rejected_rewards.requires_grad
    g_pc, g_pr, g_rc, g_rr = torch.autograd.grad(terms.loss.mean(), (pc, pr, rc, rr), allow_unused=True)
    assert g_pc.abs().min() > 0 and g_pr.abs().min() > 0
    assert g_rc is None and g_rr is None


def test_unknown_objective_lists_valid_names():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="valid: dpo, ipo, simpo, dpo_nll, orpo"):
        preference_loss("kto", x, x, x, x, x, x, beta=0.1)


def test_invalid_settings_are_refused():
    x, n = torch.zeros(2), torch.ones(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("ipo", x, x, x, x, n, n, beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="chosen_nll"):
        preference_loss("dpo_nll", x, x, x, x, n, n, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("dpo", x, x, x, x, n, n, beta=0.0)


def test_dpo_nll_weights_pairs_by_chosen_tokens():
    """The NLL term is the batch's NLL per chosen token, so a long answer weighs more than a short one, and a
    pair without chosen tokens (a filler) adds nothing."""
    zero = torch.zeros(3, dtype=torch.float64)
    tokens = torch.tensor([1, 3, 0])
    chosen_nll = torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)
    terms = preference_loss(
        "dpo_nll", zero, zero, zero, zero, tokens, tokens, beta=0.1, nll_weight=0.5, chosen_nll=chosen_nll
    )
    batch_nll = (4.0 * 1 + 2.0 * 3) / 4
    torch.testing.assert_close(
        terms.loss, torch.full((3,), math.log(2) + 0.5 * batch_nll, dtype=torch.float64)
    )
