"""ORPO and KTO in the run config: the data each trains on, the options that apply, one message per problem."""

from __future__ import annotations

import pytest

from dstrain.config.run import load_config
from dstrain.errors import ConfigError

BASE = {"data": {"train": ["data/train.jsonl"], "format": "preference"}}


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides), base=BASE)
    return info.value.problems


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective.name=orpo"],
        ["objective.name=kto"],  # a preference file: each pair gives a desirable and an undesirable example
        ["objective.name=kto", "data.format=kto", "objective.precompute_reference=true"],
        ["objective.name=kto", "data.format=kto", "train.best_metric=eval_reward_margin"],
        ["objective.name=kto", "objective.desirable_weight=1.33", "objective.undesirable_weight=0"],
    ],
)
def test_valid(overrides):
    cfg = load_config(None, overrides, base=BASE)
    assert cfg.objective.beta == 0.1  # TRL's default for dpo, orpo (its lambda) and kto alike


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["objective.name=kto", "data.format=sft-rag"], "objective.name: 'kto' needs labelled answers"),
        (["objective.name=orpo", "data.format=kto"], "objective.name: 'orpo' needs preference data"),
        (["data.format=kto"], "data.format: kto records (one answer, labelled desirable or not) train "),
        (
            ["objective.name=orpo", "objective.precompute_reference=true"],
            "objective.precompute_reference: 'orpo'",
        ),
        (
            ["objective.name=orpo", "objective.label_smoothing=0.1"],
            "objective.label_smoothing: applies to dpo",
        ),
        (
            ["objective.name=kto", "objective.undesirable_weight=-1"],
            "objective.undesirable_weight: must be >= 0",
        ),
        (
            ["objective.name=kto", "objective.desirable_weight=0", "objective.undesirable_weight=0"],
            "objective.desirable_weight, undesirable_weight: both 0",
        ),
        (
            ["objective.name=kto", "data.format=kto", "train.best_metric=eval_pref_acc"],
            "train.best_metric: eval_pref_acc needs preference eval data",
        ),
    ],
)
def test_refused_with_one_message(overrides, expected):
    found = problems(*overrides)
    assert len(found) == 1 and found[0].startswith(expected), found
