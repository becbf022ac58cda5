"""Preference objectives in real runs: the adapter-disabled reference makes step 0 exact (loss log 2,
margins 0), the pair metrics are logged, and the objectives train under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dstrain.config.demo import asset
from tests.helpers import check, dstrain, metrics, subset, write_config


@pytest.fixture
def pref_data(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": subset(asset("data", "preference_train.jsonl"), tmp_path / "train.jsonl", 64),
        "eval": subset(asset("data", "preference_eval.jsonl"), tmp_path / "eval.jsonl", 16),
    }


def pref_config(
    tmp_path: Path, files: dict[str, Path], name: str, objective: str, precompute: bool = False, **train
) -> Path:
    return write_config(
        tmp_path,
        files,
        name=name,
        data={"format": "preference"},
        objective={"name": objective, "beta": 0.1, "precompute_reference": precompute},
        train={"max_steps": 4, "log_every": 1, "save_every": 0, "eval_every": 2, **train},
    )


def test_dpo_starts_at_log2_with_zero_margins_and_logs_pair_metrics(tmp_path, pref_data):
    check(dstrain("train", "--config", str(pref_config(tmp_path, pref_data, "dpo", "dpo")), cwd=tmp_path))
    rows = metrics(tmp_path / "dpo")
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    # LoRA's B starts at zero: policy == reference, so every pair's loss is -log sigmoid(0) = log 2
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train_rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert {"rewards_chosen", "rewards_rejected", "pref_acc"} <= train_rows[-1].keys()
    assert {"eval_pref_acc", "eval_reward_margin"} <= evals[-1].keys()
    assert train_rows[-1]["reward_margin"] != 0.0  # after updates the policy has left the reference


@pytest.mark.parametrize("objective", ["ipo", "simpo", "dpo_nll"])
def test_other_objectives_train(tmp_path, pref_data, objective):
    check(
        dstrain(
            "train", "--config", str(pref_config(tmp_path, pref_data, objective, objective)), cwd=tmp_path
        )
    )
    losses = [r["loss"] for r in metrics(tmp_path / objective) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_sft_on_preference_data_reports_preference_accuracy(tmp_path, pref_data):
    check(dstrain("train", "--config", str(pref_config(tmp_path, pref_data, "sft", "sft")), cwd=tmp_path))
    evals = [r for r in metrics(tmp_path / "sft") if "eval_loss" in r]
    assert evals[0]["eval_pref_acc"] is not None and 0.0 <= evals[-1]["eval_pref_acc"] <= 1.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # NLL of the chosen answers falls


@pytest.mark.numerics
def test_precomputed_reference_matches_the_inline_reference_and_is_reused(tmp_path, pref_data):
    objective = "dpo"
    inline = pref_config(tmp_path, pref_data, "inline", objective)
    check(dstrain("train", "--config", str(inline), cwd=tmp_path))
    runs = []
    for name in ("first", "second"):  # the second run on the same data and model finds the table cached
        cfg = pref_config(tmp_path, pref_data, name, objective, precompute=True)
        runs.append(check(dstrain("train", "--config", str(cfg), cwd=tmp_path)).stdout)
    assert "reference log-probs of 64 pairs computed" in runs[0]
    assert "reference log-probs of 64 pairs loaded" in runs[1]
    want = metrics(tmp_path / "inline")
    for name in ("first", "second"):
        got = metrics(tmp_path / name)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for a, b in zip(got, want, strict=True):
            for key in ("loss", "rewards_chosen", "rewards_rejected", "eval_loss", "eval_reward_margin"):
                if key in b:  # the table's pairs were scored in other batches: other padding, float noise
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, a["step"], key)
