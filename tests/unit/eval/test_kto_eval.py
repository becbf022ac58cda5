"""KTO's eval metrics from the summed per-example table (eval/unpaired.py), against the formulas by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dstrain.config.run import ObjectiveConfig
from dstrain.eval.unpaired import DESIRABLE, MISMATCHED, RATIO, REAL, REAL_MISMATCHED, examples_metrics


def table(ratios, mismatched, desirable, real=None) -> torch.Tensor:
    n = len(ratios)
    out = torch.zeros(5, n, dtype=torch.float64)
    out[RATIO], out[MISMATCHED] = (
        torch.tensor(ratios, dtype=torch.float64),
        torch.tensor(mismatched, dtype=torch.float64),
    )
    out[REAL] = torch.tensor(real if real is not None else [1.0] * n)
    out[REAL_MISMATCHED] = out[REAL]
    out[DESIRABLE] = torch.tensor([float(d) for d in desirable])
    return out


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_one_reference_point_for_the_set_and_the_mean_loss_per_example():
    beta, wd, wu = 0.5, 1.0, 1.5
    objective = ObjectiveConfig(name="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu)
    # the 4th example is a filler row (not real): its numbers must count for nothing
    got = examples_metrics(
        table([2.0, -1.0, 0.5, 99.0], [1.0, 0.2, 0.3, 99.0], [1, 0, 1, 1], [1, 1, 1, 0]), objective, False
    )
    z0 = (1.0 + 0.2 + 0.3) / 3
    losses = [
        wd * (1 - sigmoid(beta * (2.0 - z0))),
        wu * (1 - sigmoid(beta * (z0 + 1.0))),
        wd * (1 - sigmoid(beta * (0.5 - z0))),
    ]
    assert got["eval_loss"] == pytest.approx(sum(losses) / 3, abs=1e-12)
    assert got["eval_kl"] == pytest.approx(z0, abs=1e-12)
    assert got["eval_reward_margin"] == pytest.approx(beta * (2.0 + 0.5) / 2 - beta * -1.0, abs=1e-12)
    assert "eval_pref_acc" not in got


def test_negative_kl_estimate_is_clamped_and_pairs_give_preference_accuracy():
    """From a preference file: examples 2r (chosen) and 2r + 1 (rejected); a pair with a filler side is left
    out of the accuracy."""
    objective = ObjectiveConfig(name="kto", beta=0.1)
    ratios = [1.0, 0.5, -2.0, 0.0, 3.0, 4.0, 1.0]  # pairs: right, wrong, wrong (but side 2 is a filler)
    got = examples_metrics(
        table(ratios, [-1.0] * 7, [1, 0, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 0, 1]), objective, True
    )
    assert got["eval_kl"] == 0.0
    assert got["eval_pref_acc"] == pytest.approx(0.5)
