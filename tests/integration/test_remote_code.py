"""A model that brings its own modeling code (a tiny MiniCPM-2B-style dir, tests/fixtures/remote_minicpm):
refused with one clear error without `model.trust_remote_code`, trained against its own logits with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dstrain.config.demo import asset
from dstrain.config.run import DataConfig, ModelConfig
from dstrain.data.batches import IGNORE, tokenize_record
from dstrain.data.records import parse_text
from dstrain.model.build import load_tokenizer
from tests.fixtures.remote_minicpm import write_remote_minicpm
from tests.helpers import assert_clean_failure, check, metrics, train_single, write_config

DATA = DataConfig(max_seq_len=256, max_passage_tokens=160)
REL = 1e-5


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_remote_minicpm(tmp_path_factory.mktemp("remote") / "minicpm")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Train: one record 8 times; eval: 4 other records."""
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    first = Path(asset("data", "sft_rag_train.jsonl")).read_text(encoding="utf-8").splitlines()[0]
    train.write_text("\n".join([first] * 8) + "\n", encoding="utf-8")
    eval_lines = Path(asset("data", "sft_rag_eval.jsonl")).read_text(encoding="utf-8").splitlines()[:4]
    evals.write_text("\n".join(eval_lines) + "\n", encoding="utf-8")
    return {"train": train, "eval": evals}


def config(tmp_path: Path, files: dict[str, Path], remote: Path, **model: object) -> Path:
    return write_config(
        tmp_path,
        files,
        model={"path": str(remote), **model},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        data={"max_seq_len": DATA.max_seq_len, "max_passage_tokens": DATA.max_passage_tokens},
        train={"max_steps": 3, "eval_every": 3, "save_every": 0, "global_batch_size": 4},
    )


def test_without_the_flag_one_clear_error(tmp_path: Path, files: dict[str, Path], remote: Path):
    proc = train_single(config(tmp_path, files, remote), cwd=tmp_path)
    assert_clean_failure(
        proc, "modeling_minicpm.MiniCPMForCausalLM", "model.trust_remote_code: true", str(remote)
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def own_loss(model: torch.nn.Module, model_dir: Path, path: Path) -> float:
    """The model's own `labels=` loss over the records of `path`, token-weighted like dstrain's eval."""
    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir), trust_remote_code=True))
    total = count = 0.0
    with torch.no_grad():
        for line in path.read_text(encoding="utf-8").splitlines():
            example = tokenize_record(tokenizer, parse_text(line, "sft-rag"), DATA)
            ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def test_trains_against_its_own_logits(tmp_path: Path, files: dict[str, Path], remote: Path):
    proc = check(train_single(config(tmp_path, files, remote, trust_remote_code=True), cwd=tmp_path))
    warning = "warning: model.trust_remote_code: running modeling code from"
    assert (proc.stdout + proc.stderr).count(warning) == 1 and str(remote) in proc.stderr
    rows = metrics(tmp_path / "run")
    evals = [r for r in rows if "eval_loss" in r]
    steps = [r for r in rows if "loss" in r]
    base = AutoModelForCausalLM.from_pretrained(remote, dtype=torch.float32, trust_remote_code=True).eval()
    assert evals[0]["step"] == 0 and len(steps) == 3
    want = own_loss(base, remote, files["eval"])
    assert abs(evals[0]["eval_loss"] - want) <= REL * want, (evals[0], want)
    first = own_loss(base, remote, files["train"])
    assert abs(steps[0]["loss"] - first) <= REL * first, (steps[0], first)
