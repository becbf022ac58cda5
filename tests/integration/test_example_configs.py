"""Every example config under configs/ validates and trains two steps as shipped (one local process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstrain.config.run import load_config
from dstrain.training.prepare import preflight
from tests.helpers import REPO, check, metrics, train_single

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    assert {p.name for p in CONFIGS} >= {"sft_rag.yaml", "sft_kbalign.yaml", "sft_preference_zero3.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_preflights_for_two_ranks(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    preflight(load_config(path), world=2)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_trains(path: Path, tmp_path: Path):
    out = tmp_path / "run"
    overrides = [
        "train.max_steps=2",
        "train.epochs=0",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval_every=0",
        "data.max_eval_samples=8",
        f"output_dir={out}",
    ]
    args = [a for o in overrides for a in ("--set", o)]
    check(train_single(path, *args, cwd=REPO))
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2]
    assert (out / "checkpoints" / "step-00000002" / "adapter_model.safetensors").is_file()
