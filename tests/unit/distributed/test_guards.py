"""Guards against inputs that would otherwise train wrongly, count wrongly, or hang."""

from __future__ import annotations

import json

import pytest

from dstrain.config.run import config_from_dict
from dstrain.data.loader import TokenizedCorpus
from dstrain.distributed.env import read_env
from dstrain.errors import DistributedError
from dstrain.model.build import load_tokenizer
from dstrain.training.prepare import index_split


def test_over_long_records_surface_at_tokenisation_with_their_line(tmp_path):
    """The index validates JSON and fields; a prompt over max_seq_len is only known once tokenised, and then
    comes back as a bad record naming its file and line (the loop applies data.on_error to it)."""
    good = {"query": "q?", "retrieval_result": ["short passage"], "answer": "a"}
    long = {"query": "why " * 400, "retrieval_result": ["p"], "answer": "a"}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, long, good, long]) + "\n")
    cfg = config_from_dict({"data": {"train": [str(path)], "max_seq_len": 64, "max_passage_tokens": 16}})
    corpus = index_split(cfg.data.train, "data.train", cfg)
    assert (len(corpus), corpus.num_bad) == (4, 0)
    dataset = TokenizedCorpus(corpus, load_tokenizer(cfg.model), cfg.data)
    items = [dataset[i] for i in range(4)]
    assert [type(item).__name__ for item in items] == ["Example", "BadRecord", "Example", "BadRecord"]
    assert str(items[1]).startswith(f"{path}:2: over-long record: the prompt alone is")
    assert items[3].line == 4


def test_multi_rank_environment_without_rendezvous_fails_fast(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR/MASTER_PORT"):
        read_env()
