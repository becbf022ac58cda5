"""Guards against inputs that would otherwise train wrongly, count wrongly, or hang."""

from __future__ import annotations

import json

import pytest

from dstrain.config import LoraConfig, ModelConfig, config_from_dict
from dstrain.distributed import read_env
from dstrain.errors import ConfigError, DataError, DistributedError
from dstrain.model import build_model, load_tokenizer
from dstrain.prepare import load_split
from dstrain.supervised import SupervisedLM


def test_over_long_records_are_counted_once_against_max_bad_fraction(tmp_path):
    good = {"query": "q?", "retrieval_result": ["short passage"], "answer": "a"}
    long = {"query": "why " * 400, "retrieval_result": ["p"], "answer": "a"}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, long, good, long]) + "\n")
    raw = {
        "data": {
            "train": [str(path)],
            "max_seq_len": 64,
            "max_passage_tokens": 16,
            "on_error": "skip",
            "max_bad_fraction": 0.4,
        }
    }
    cfg = config_from_dict(raw)
    with pytest.raises(DataError, match=r"2 of 4 records are bad \(50\.0%\)"):
        load_split(cfg.data.train, "data.train", load_tokenizer(cfg.model), cfg)
    cfg.data.max_bad_fraction = 0.5
    examples, skipped = load_split(cfg.data.train, "data.train", load_tokenizer(cfg.model), cfg)
    assert (len(examples), skipped) == (2, 2)


@pytest.mark.parametrize(("field", "value"), [("final_logit_softcapping", 30.0), ("logits_scaling", 4.0)])
def test_models_that_transform_logits_are_refused(field, value):
    model = build_model(ModelConfig(), LoraConfig(dropout=0.0), zero_stage=2)
    setattr(model.get_base_model().config, field, value)
    with pytest.raises(ConfigError, match=field):
        SupervisedLM(model)


def test_multi_rank_environment_without_rendezvous_fails_fast(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR/MASTER_PORT"):
        read_env()


def test_stale_torch_extension_build_locks_are_found(tmp_path, monkeypatch):
    import os
    import time

    from dstrain.distributed import stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "py311_cpu" / "fused_adam").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "cpu_adam").mkdir(parents=True)
    old = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    fresh = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    old.write_text("")
    fresh.write_text("")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    found = stale_build_locks(max_age_s=600)
    assert [path for path, _ in found] == [str(old)]  # a build in progress (fresh lock) is not reported
    assert found[0][1] > 3000
