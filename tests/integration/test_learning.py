"""Training makes the model better, not only the loss lower: on the generated retrieval-grounded task
(dstrain/synthetic.py, answers readable only from the passages), a real `dstrain train` run of the bundled
tiny model raises held-out greedy exact match from 0. Fixed seeds; bench/learning_bench.py records the curves
(BENCHMARKS.md). DPO on the same task is not asserted here yet: whether it leaves the plateau within a few
hundred steps depends on the draw (see BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dstrain.config import ModelConfig
from dstrain.model import load_tokenizer
from dstrain.synthetic import TaskSpec, run_config, write_task
from tests.helpers import check, dstrain, metrics


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    spec = TaskSpec(train=SFT_STEPS * 16, eval=100)
    return write_task(tmp_path_factory.mktemp("task"), load_tokenizer(ModelConfig()), spec)


SFT_STEPS = 1500


def run(tmp_path: Path, kind: str, files: dict[str, Path], steps: int) -> list[dict]:
    cfg = run_config(kind, files, tmp_path / kind, steps, eval_every=steps // 5)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    check(dstrain("train", "--config", str(path), cwd=tmp_path))
    return [row for row in metrics(tmp_path / kind) if "eval_loss" in row]


def test_sft_raises_heldout_exact_match(tmp_path, task):
    evals = run(tmp_path, "sft", task, SFT_STEPS)
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == SFT_STEPS
    assert first["eval_exact_match"] <= 0.05, first  # the base model does not answer in this format
    assert last["eval_exact_match"] >= 0.8, evals
    assert last["eval_token_f1"] >= last["eval_exact_match"]
