"""A model that brings its own modeling code (a tiny MiniCPM-2B-style dir, tests/fixtures/remote_minicpm):
refused with one clear error without `model.trust_remote_code`, trained against its own logits with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.families import DATA_LIMITS, own_loss, repeated_record_files
from tests.fixtures.remote_minicpm import write_remote_minicpm
from tests.helpers import assert_clean_failure, check, metrics, train_single, write_config

REL = 1e-5


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_remote_minicpm(tmp_path_factory.mktemp("remote") / "minicpm")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return repeated_record_files(tmp_path)


def config(tmp_path: Path, files: dict[str, Path], remote: Path, **model: object) -> Path:
    return write_config(
        tmp_path,
        files,
        model={"path": str(remote), **model},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        data=DATA_LIMITS,
        train={"max_steps": 3, "eval_every": 3, "save_every": 0, "global_batch_size": 4},
    )


def test_without_the_flag_one_clear_error(tmp_path: Path, files: dict[str, Path], remote: Path):
    proc = train_single(config(tmp_path, files, remote), cwd=tmp_path)
    assert_clean_failure(
        proc, "modeling_minicpm.MiniCPMForCausalLM", "model.trust_remote_code: true", str(remote)
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_trains_against_its_own_logits(tmp_path: Path, files: dict[str, Path], remote: Path):
    proc = check(train_single(config(tmp_path, files, remote, trust_remote_code=True), cwd=tmp_path))
    warning = "warning: model.trust_remote_code: running modeling code from"
    assert (proc.stdout + proc.stderr).count(warning) == 1 and str(remote) in proc.stderr
    rows = metrics(tmp_path / "run")
    evals = [r for r in rows if "eval_loss" in r]
    steps = [r for r in rows if "loss" in r]
    base = AutoModelForCausalLM.from_pretrained(remote, dtype=torch.float32, trust_remote_code=True).eval()
    assert evals[0]["step"] == 0 and len(steps) == 3
    want = own_loss(base, remote, files["eval"], trust_remote_code=True)
    assert abs(evals[0]["eval_loss"] - want) <= REL * want, (evals[0], want)
    first = own_loss(base, remote, files["train"], trust_remote_code=True)
    assert abs(steps[0]["loss"] - first) <= REL * first, (steps[0], first)
