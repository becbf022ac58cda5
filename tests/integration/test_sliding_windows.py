"""A real packed SFT run on a sliding-window model trains on the model's own attention.

A tiny Mistral with an 8-token window (every RAG prompt here is longer), records short enough that packing
lays two or three into each row. The first step's loss is transformers' own token-weighted `labels=` loss
with each record in its own row, rel 1e-5 in fp32; one micro batch holds the whole global batch, so no
loss normalisation question enters. A run whose packed mask misses the window (broken on purpose in the
child process) is stopped by the first-batch self-check before step 1, with its one message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.families import own_loss, write_family
from tests.helpers import REPO, assert_clean_failure, check, metrics, subset, train_single, write_config

WINDOW = 8
LIMITS = {"max_seq_len": 256, "max_passage_tokens": 24}  # records of 60-110 tokens: 2-3 per packed row
# The child's sitecustomize: every sliding layer sees the whole record, the mask packing handed before.
NO_WINDOW = """
import torch
import dstrain.model.windows as windows
windows.in_window = lambda positions, window: torch.ones((), dtype=torch.bool)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model dir, train file of 8 records, a ZeRO-2 JSON whose one micro batch is the global batch)."""
    from dstrain.config.demo import asset

    root = tmp_path_factory.mktemp("windows")
    model_dir = write_family("mistral", root / "model", sliding_window=WINDOW)
    train = subset(asset("data", "sft_rag_train.jsonl"), root / "train.jsonl", 8)
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 8
    (root / "zero2-micro8.json").write_text(json.dumps(ds))
    return model_dir, train, root / "zero2-micro8.json"


def packed_config(tmp_path: Path, setup: tuple[Path, Path, Path]) -> Path:
    model_dir, train, ds = setup
    return write_config(
        tmp_path,
        {"train": train, "eval": train},
        model={"path": str(model_dir)},
        data={**LIMITS, "packing": True, "eval": []},
        train={"max_steps": 1, "save_every": 0, "eval_every": 0, "global_batch_size": 8},
        ds_config=str(ds),
    )


def test_packed_sft_step_one_is_the_models_own_loss_per_row(tmp_path: Path, setup):
    model_dir, train, _ = setup
    check(train_single(packed_config(tmp_path, setup), cwd=tmp_path))
    step_one = next(
        row["loss"] for row in metrics(tmp_path / "run") if row.get("step") == 1 and "loss" in row
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.config.sliding_window == WINDOW
    assert step_one == pytest.approx(own_loss(model, model_dir, train, limits=LIMITS), rel=1e-5)


def test_a_packed_mask_without_the_window_stops_before_step_one(tmp_path: Path, setup, monkeypatch):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(NO_WINDOW, encoding="utf-8")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(probe), str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = train_single(packed_config(tmp_path, setup), cwd=tmp_path)
    assert_clean_failure(proc, "data.packing: the log-probs of MistralForCausalLM", "own padded row")
    assert not [row for row in metrics(tmp_path / "run") if "loss" in row]
