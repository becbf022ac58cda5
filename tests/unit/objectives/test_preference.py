"""score_pairs / mean_over_pairs: the per-pair terms the train step and the eval loop share, against numbers
worked out by hand and against dstrain.objectives.losses on the same log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from dstrain.config.run import ObjectiveConfig
from dstrain.objectives.losses import dpo_loss, preference_loss
from dstrain.objectives.preference import mean_over_pairs, score_pairs

# Three pairs, rows chosen (0..2) then rejected (3..5); pair 2 is filler (no answer tokens).
POLICY = torch.tensor([-4.0, -6.0, 0.0, -5.0, -5.0, 0.0], dtype=torch.float64)
REFERENCE = torch.tensor([-4.5, -5.0, 0.0, -4.0, -6.0, 0.0], dtype=torch.float64)
TOKENS = torch.tensor([4, 3, 0, 5, 2, 0])
BETA = 0.1


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_rewards_margin_and_validity_by_hand():
    scores = score_pairs(ObjectiveConfig(name="dpo", beta=BETA), POLICY, REFERENCE, TOKENS)
    # pair 0: chosen -4 - -4.5 = 0.5, rejected -5 - -4 = -1  -> rewards 0.05, -0.1, margin 0.15
    # pair 1: chosen -6 - -5 = -1,  rejected -5 - -6 = 1     -> rewards -0.1, 0.1, margin -0.2
    assert scores.chosen_rewards.tolist() == pytest.approx([0.05, -0.1, 0.0])
    assert scores.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1, 0.0])
    assert scores.margin.tolist() == pytest.approx([0.15, -0.2, 0.0])
    assert scores.valid.tolist() == [1.0, 1.0, 0.0]
    assert scores.chosen_nll.tolist() == pytest.approx([1.0, 2.0, 0.0])  # -logp / tokens, 0 tokens -> 0
    assert scores.loss.tolist() == pytest.approx([-_log_sigmoid(0.15), -_log_sigmoid(-0.2), math.log(2)])


def test_filler_pairs_are_left_out_of_the_mean():
    scores = score_pairs(ObjectiveConfig(name="dpo", beta=BETA), POLICY, REFERENCE, TOKENS)
    expected = (-_log_sigmoid(0.15) - _log_sigmoid(-0.2)) / 2  # not /3, and not counting log 2
    assert mean_over_pairs(scores.loss, scores.valid).item() == pytest.approx(expected)
    right = (scores.margin > 0).to(scores.valid.dtype)
    assert mean_over_pairs(right, scores.valid).item() == 0.5


def test_only_filler_pairs_give_zero_with_a_graph():
    values = torch.tensor([1.5, 2.5], requires_grad=True)
    mean = mean_over_pairs(values, torch.zeros(2))
    assert mean.item() == 0.0
    mean.backward()  # every rank still runs backward
    assert values.grad.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "dpo_nll"])
def test_loss_and_rewards_are_the_objectives(name):
    objective = ObjectiveConfig(name=name, beta=0.25, simpo_gamma=0.3, nll_weight=0.7)
    scores = score_pairs(objective, POLICY, REFERENCE, TOKENS)
    pc, pr, rc, rr = POLICY[:3], POLICY[3:], REFERENCE[:3], REFERENCE[3:]
    tc, tr = TOKENS[:3], TOKENS[3:]
    terms = preference_loss(
        name,
        pc,
        pr,
        rc,
        rr,
        tc,
        tr,
        beta=0.25,
        simpo_gamma=0.3,
        nll_weight=0.7,
        chosen_nll=-pc / tc.clamp(min=1),
    )
    torch.testing.assert_close(scores.loss, terms.loss)
    torch.testing.assert_close(scores.chosen_rewards, terms.chosen_rewards)
    torch.testing.assert_close(scores.rejected_rewards, terms.rejected_rewards)
    # the margin is DPO's implicit one whatever the objective, so pref_acc means the same in every run
    torch.testing.assert_close(scores.margin, 0.25 * ((pc - rc) - (pr - rr)))


def test_sft_runs_report_dpos_view():
    smoothing = 0.1
    scores = score_pairs(
        ObjectiveConfig(name="sft", beta=BETA, label_smoothing=smoothing), POLICY, REFERENCE, TOKENS
    )
    dpo = dpo_loss(POLICY[:3], POLICY[3:], REFERENCE[:3], REFERENCE[3:], beta=BETA, label_smoothing=smoothing)
    torch.testing.assert_close(scores.loss, dpo.loss)
    torch.testing.assert_close(scores.chosen_rewards, dpo.chosen_rewards)


def test_margin_is_detached_and_the_loss_is_not():
    policy = POLICY.clone().requires_grad_()
    scores = score_pairs(ObjectiveConfig(name="dpo", beta=BETA), policy, REFERENCE, TOKENS)
    assert scores.loss.requires_grad and not scores.margin.requires_grad
    mean_over_pairs(scores.loss, scores.valid).backward()
    assert policy.grad[2].item() == 0.0 and policy.grad[5].item() == 0.0  # filler pair: no gradient
    assert policy.grad[0].item() != 0.0


def test_an_odd_number_of_rows_is_refused():
    with pytest.raises(ValueError, match="expected 2B values"):
        score_pairs(ObjectiveConfig(name="dpo"), POLICY[:5], REFERENCE[:5], TOKENS[:5])
