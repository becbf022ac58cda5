"""ORPO and KTO against TRL 1.16's own loss code on identical log-probs (as test_objectives_trl.py does for DPO,
IPO, SimPO): `ORPOTrainer.get_batch_loss_metrics` and `KTOTrainer._compute_loss`, called unbound on trainers
made with `object.__new__` that carry only the attributes the methods read, with stand-in models whose
outputs are built from the numbers dstrain sees. Everything in float64 on CPU. Under global normalisation
(objectives/normalize.py) the micro batches' shares of one global batch must add up to TRL on the whole batch.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from dstrain.config.run import ObjectiveConfig
from dstrain.objectives.kto import kto_loss, mismatched_sums, reference_point, score_examples
from dstrain.objectives.losses import preference_loss
from dstrain.objectives.normalize import StepUnits, example_contribution, pair_contribution
from dstrain.objectives.preference import nll_weight, score_pairs
from dstrain.training.objective import kto_means, orpo_means
from tests.unit.objectives.trl_stubs import bare_trainer, paired_batch

with warnings.catch_warnings():  # TRLExperimentalWarning: ORPO lives under trl.experimental in 1.16
    warnings.simplefilter("ignore")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

TOL = dict(rtol=0.0, atol=1e-9)  # float64 on both sides: agreement is at rounding level
# TRL's odds_ratio_loss casts the mean log-probs to float32 (`.float()`): its ratio term, rewards and log odds
# carry float32 rounding (measured here: 2e-8 on the loss), which dstrain's float64 arithmetic does not
ORPO_TOL = dict(rtol=1e-6, atol=1e-7)
B, T, V = 6, 12, 11  # pairs (KTO: examples), sequence length, vocab


class _LogitsLM:
    """The policy of ORPO's logits path: fixed logits [2B, T, V] whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, input_ids, attention_mask, use_cache, **_) -> SimpleNamespace:
        assert input_ids.shape == self.logits.shape[:2]
        return SimpleNamespace(logits=self.logits)


def _answer_mask(gen: torch.Generator, rows: int) -> torch.Tensor:
    """[rows, T] answer positions after a prompt of 1-3 tokens, of different lengths."""
    mask = torch.zeros(rows, T, dtype=torch.long)
    for row in range(rows):
        start = int(torch.randint(1, 4, (1,), generator=gen))
        mask[row, start : start + int(torch.randint(1, T - start + 1, (1,), generator=gen))] = 1
    return mask


def _orpo_batch(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ORPO's batch and its logits leaf. TRL's NLL term counts every position whose attention mask is 1
    (prompt and answer: "orpo chosen nll loss is computed over the full prompt and response"); dstrain's, like
    the ORPO paper's SFT term, the answer tokens only. Masking the prompt out of TRL's attention mask (the
    stand-in model ignores it) makes TRL's NLL the answer-token NLL, so the two losses can be compared."""
    gen = torch.Generator().manual_seed(seed)
    mask = _answer_mask(gen, 2 * B)
    input_ids = torch.randint(1, V, (2 * B, T), generator=gen)
    labels = input_ids.masked_fill(mask == 0, -100)
    logits = (2.0 * torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)).requires_grad_()
    return paired_batch(input_ids, labels, mask, B), logits


def _row_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dstrain's inputs, computed independently: each row's summed answer log-prob and token count."""
    targets = labels[:, 1:]
    answer = targets != -100
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * answer).sum(1), answer.sum(1)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    """orpo == trl/experimental/orpo ORPOTrainer.get_batch_loss_metrics (concatenated_forward ->
    get_batch_logps(average_log_prob=True), odds_ratio_loss): loss, rewards, log odds terms and gradient."""
    batch, logits = _orpo_batch(seed=11)
    trainer = bare_trainer(
        ORPOTrainer,
        beta=beta,
        is_encoder_decoder=False,
        padding_value=0,
    )
    trl_loss, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, _LogitsLM(logits), batch)

    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    policy, tokens = _row_logps(logits, labels)
    pc, pr, tc, tr = policy[:B], policy[B:], tokens[:B], tokens[B:]
    zero = torch.zeros(B, dtype=torch.float64)
    ours = preference_loss("orpo", pc, pr, zero, zero, tc, tr, beta=beta, chosen_nll=-pc / tc)
    torch.testing.assert_close(ours.loss.mean(), trl_loss, **ORPO_TOL)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-7)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-7)
    # what dstrain logs, from the training step's own helper: TRL's nll_loss, log_odds_ratio, log_odds_chosen
    scores = score_pairs(ObjectiveConfig(name="orpo", beta=beta), policy, None, tokens)
    logged = {name: float((t / c).detach()) for name, (t, c) in orpo_means(scores).items()}
    assert logged["nll_loss"] == pytest.approx(metrics["nll_loss"], abs=1e-9)  # float64 in TRL too
    assert logged["log_odds_ratio"] == pytest.approx(metrics["log_odds_ratio"], abs=1e-7)
    assert logged["log_odds"] == pytest.approx(metrics["log_odds_chosen"], abs=1e-7)
    margin = (scores.margin * scores.valid).sum() / scores.valid.sum()
    assert float(margin) == pytest.approx(metrics["rewards/margins"], abs=1e-7)
    (ours_grad,) = torch.autograd.grad(ours.loss.mean(), logits, retain_graph=True)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    torch.testing.assert_close(ours_grad, trl_grad, **ORPO_TOL)
    assert ours_grad.abs().sum() > 0


def test_orpo_filler_pairs_stay_finite():
    """A pair without answer tokens (a filler) has no mean log-prob: its log odds stay finite, and so does
    the gradient through the mask that drops it (log(1 - e^0) would be -inf, and inf x 0 a NaN)."""
    pc = torch.tensor([-2.0, 0.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-5.0, 0.0], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([2, 0])
    zero = torch.zeros(2, dtype=torch.float64)
    terms = preference_loss("orpo", pc, pr, zero, zero, tokens, tokens, beta=0.1, chosen_nll=-pc / 2)
    valid = (tokens > 0).double()
    (terms.loss * valid).sum().backward()
    assert torch.isfinite(terms.loss).all() and torch.isfinite(pc.grad).all() and pc.grad[1] == 0


class _KtoLM:
    """The policy of KTO's fused-head path: per-token log-probs [N, T-1] of the answer rows or of the
    mismatched (KL) rows, told apart by which input_ids tensor the trainer passes; 0 where the label is -100."""

    def __init__(self, inputs: dict[torch.Tensor, torch.Tensor]) -> None:
        self.inputs = inputs

    def __call__(self, *, input_ids, labels, fused_lm_head, **_) -> SimpleNamespace:
        assert fused_lm_head
        per_token = next(v for k, v in self.inputs.items() if k is input_ids)
        log_probs = per_token * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(log_probs).detach()
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


def _kto_batch(seed: int, kl_shift: float) -> dict:
    """Answer and mismatched rows with random per-token log-probs (the answers' a grad leaf), precomputed
    reference log-probs near the policy's (the mismatched ones shifted by -kl_shift: z0 ~ kl_shift), labels."""
    gen = torch.Generator().manual_seed(seed)
    answer_mask, kl_mask = _answer_mask(gen, B), _answer_mask(gen, B)
    answer = (-3.0 * torch.rand(B, T - 1, generator=gen, dtype=torch.float64)).requires_grad_()
    mismatched = -3.0 * torch.rand(B, T - 1, generator=gen, dtype=torch.float64)
    policy = (answer * answer_mask[:, 1:]).sum(1)
    policy_kl = (mismatched * kl_mask[:, 1:]).sum(1)
    noise = torch.randn(2, B, generator=gen, dtype=torch.float64)
    return {
        "answer_mask": answer_mask,
        "kl_mask": kl_mask,
        "per_token": answer,
        "per_token_kl": mismatched,
        "policy": policy,
        "policy_kl": policy_kl,
        "ref": policy.detach() + noise[0],
        "ref_kl": policy_kl - kl_shift + 0.3 * noise[1],
        "label": torch.tensor([True, False, True, True, False, False]),
    }


def _trl_kto(data: dict, beta: float, weights: tuple[float, float]):
    trainer = bare_trainer(
        KTOTrainer,
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        loss_type="kto",
        calculate_KL=True,
        precompute_ref_logps=True,
    )
    input_ids = torch.zeros(B, T, dtype=torch.long)
    kl_input_ids = torch.ones(B, T, dtype=torch.long)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "completion_mask": data["answer_mask"],
        "KL_input_ids": kl_input_ids,
        "KL_attention_mask": torch.ones(B, T, dtype=torch.long),
        "KL_completion_mask": data["kl_mask"],
        "label": data["label"],
        "ref_logps": data["ref"],
        "ref_KL_logps": data["ref_kl"],
    }
    model = _KtoLM({input_ids: data["per_token"], kl_input_ids: data["per_token_kl"]})
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize(
    ("beta", "weights", "kl_shift"),
    [(0.1, (1.0, 1.0), 2.0), (0.5, (1.0, 1.33), 2.0), (0.3, (0.7, 1.0), -3.0)],  # the last: z0 clamped to 0
)
def test_kto_matches_trl(beta, weights, kl_shift):
    """kto == trl/trainer/kto_trainer.py KTOTrainer._compute_loss, loss_type="kto" with the KL estimate and
    precomputed reference log-probs: the loss (mean over examples), rewards by label, the KL and the gradient."""
    data = _kto_batch(seed=21, kl_shift=kl_shift)
    trl_loss, metrics = _trl_kto(data, beta, weights)
    policy = torch.cat([data["policy"], data["policy_kl"]])
    reference = torch.cat([data["ref"], data["ref_kl"]])
    tokens = torch.cat([data["answer_mask"].sum(1), data["kl_mask"].sum(1)])
    total, count = mismatched_sums(policy, reference, tokens)
    kl = reference_point(total, count)
    assert float(kl) == pytest.approx(metrics["kl"][0], abs=1e-12)
    assert (float(kl) == 0.0) == (kl_shift < 0)
    objective = ObjectiveConfig(
        name="kto", beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1]
    )
    terms = score_examples(objective, policy, reference, tokens, data["label"], kl)
    ours = (terms.loss * terms.valid).sum() / terms.valid.sum()
    torch.testing.assert_close(ours, trl_loss, **TOL)
    logged = {name: float(t / c) for name, (t, c) in kto_means(terms, kl).items()}
    assert logged["rewards_chosen"] == pytest.approx(metrics["rewards/chosen"][0], abs=1e-9)
    assert logged["rewards_rejected"] == pytest.approx(metrics["rewards/rejected"][0], abs=1e-9)
    (ours_grad,) = torch.autograd.grad(ours, data["per_token"], retain_graph=True)
    (trl_grad,) = torch.autograd.grad(trl_loss, data["per_token"])
    torch.testing.assert_close(ours_grad, trl_grad, **TOL)
    assert ours_grad.abs().sum() > 0


def test_kto_closed_form():
    """Hand-derived at r = z0: every loss is w/2, and the gradient -wβ/4 (desirable) or +wβ/4 (undesirable)."""
    r = torch.tensor([0.7, 0.7], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([True, False])
    loss, rewards = kto_loss(
        r, torch.zeros(2), labels, torch.tensor(0.7), beta=0.2, desirable_weight=2.0, undesirable_weight=1.0
    )
    torch.testing.assert_close(loss, torch.tensor([1.0, 0.5], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), r)
    torch.testing.assert_close(grad, torch.tensor([-2.0 * 0.2 / 4, 0.2 / 4], dtype=torch.float64))
    assert not rewards.requires_grad


# ------------------------------------------- global normalisation: micro batches add up to the whole batch

SPLIT = (slice(0, 2), slice(2, 3), slice(3, 6))  # one global batch of 6 as micro batches of 2, 1 and 3


def _rows(values: torch.Tensor, rows: slice, filler: bool) -> torch.Tensor:
    """A micro batch's rows [2b] (answers, then second answers) of per-row values [2B], with a filler pair
    (no tokens, garbage log-probs) appended when asked: it must count for nothing."""
    half = values.shape[0] // 2
    pad = torch.full((int(filler),), -7.0 if values.is_floating_point() else 0).to(values.dtype)
    return torch.cat([values[:half][rows], pad, values[half:][rows], pad])


def test_orpo_micro_batch_shares_add_up_to_trl_on_the_global_batch():
    """objective.loss_normalization=global: each micro batch's pair_contribution (its pairs over the global
    batch's 6, its chosen NLL over the global batch's chosen tokens) sums to TRL's loss on all 6 pairs at once,
    and so does the gradient."""
    batch, logits = _orpo_batch(seed=5)
    trainer = bare_trainer(
        ORPOTrainer,
        beta=0.1,
        is_encoder_decoder=False,
        padding_value=0,
    )
    trl_loss, _ = ORPOTrainer.get_batch_loss_metrics(trainer, _LogitsLM(logits), batch)
    policy, tokens = _row_logps(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    objective = ObjectiveConfig(name="orpo", beta=0.1)
    units = StepUnits(tokens=tokens[:B].sum(), pairs=torch.tensor(B), scale=len(SPLIT))
    shares = []
    for i, rows in enumerate(SPLIT):
        mine = _rows(policy, rows, filler=i == 1), _rows(tokens, rows, filler=i == 1)
        scores = score_pairs(objective, mine[0], None, mine[1], batch_nll=False)
        shares.append(pair_contribution(scores, units, nll_weight(objective)))
    ours = torch.stack(shares).sum()
    torch.testing.assert_close(ours, trl_loss, **ORPO_TOL)
    (ours_grad,) = torch.autograd.grad(ours, logits, retain_graph=True)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    torch.testing.assert_close(ours_grad, trl_grad, **ORPO_TOL)


def test_kto_micro_batch_shares_add_up_to_trl_on_the_global_batch():
    """objective.loss_normalization=global: one reference point from every micro batch's mismatched sums (as
    training/objective.step_units all-reduces them), each micro batch's example_contribution over the global
    batch's 6 examples: the shares sum to TRL's loss on all 6 examples at once, and so does the gradient."""
    data = _kto_batch(seed=8, kl_shift=1.5)
    trl_loss, metrics = _trl_kto(data, 0.2, (1.0, 1.33))
    objective = ObjectiveConfig(name="kto", beta=0.2, desirable_weight=1.0, undesirable_weight=1.33)
    policy = torch.cat([data["policy"], data["policy_kl"]])
    reference = torch.cat([data["ref"], data["ref_kl"]])
    tokens = torch.cat([data["answer_mask"].sum(1), data["kl_mask"].sum(1)])
    micro = []  # (policy, reference, tokens, labels) of each micro batch; the filler is labelled desirable
    for i, rows in enumerate(SPLIT):
        labels = torch.cat([data["label"][rows], torch.ones(int(i == 1), dtype=torch.bool)])
        micro.append((*(_rows(v, rows, i == 1) for v in (policy, reference, tokens)), labels))
    kl = reference_point(*torch.stack([mismatched_sums(p, ref, t) for p, ref, t, _ in micro]).sum(0))
    assert float(kl) == pytest.approx(metrics["kl"][0], abs=1e-12) and float(kl) > 0
    units = StepUnits(tokens=tokens[:B].sum(), pairs=torch.tensor(B), scale=len(SPLIT))
    shares = []
    for p, ref, t, labels in micro:
        terms = score_examples(objective, p, ref, t, labels, kl)
        shares.append(example_contribution(terms.loss, terms.valid, units))
    ours = torch.stack(shares).sum()
    torch.testing.assert_close(ours, trl_loss, **TOL)
    (ours_grad,) = torch.autograd.grad(ours, data["per_token"], retain_graph=True)
    (trl_grad,) = torch.autograd.grad(trl_loss, data["per_token"])
    torch.testing.assert_close(ours_grad, trl_grad, **TOL)
