"""data.train as a plain list (unchanged) or a mixture of sources: parsing, defaults and the checks, each
problem named by its item."""

from __future__ import annotations

import pytest

from dstrain.config.run import config_from_dict, dump_yaml
from dstrain.config.sources import DataSource, default_name, is_mixture, sources_of
from dstrain.errors import ConfigError


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value.problems


def test_a_plain_list_keeps_its_meaning_and_its_snapshot():
    cfg = config_from_dict({"data": {"train": ["a.jsonl", "more/*.jsonl"]}})
    assert cfg.data.train == ["a.jsonl", "more/*.jsonl"] and not is_mixture(cfg.data.train)
    assert "  train:\n  - a.jsonl\n  - more/*.jsonl\n" in dump_yaml(cfg)
    assert config_from_dict({"data": {"train": "a.jsonl"}}).data.train == ["a.jsonl"]


def test_mappings_make_a_mixture_with_defaults_filled():
    cfg = config_from_dict(
        {
            "data": {
                "format": "sft-rag",
                "train": [
                    {"path": "rag.jsonl", "weight": 3},
                    {"path": "general/*.parquet", "format": "messages", "max_samples": 100, "epochs": 2},
                    "extra/notes.v2.jsonl",
                ],
            }
        }
    )
    assert is_mixture(cfg.data.train) and isinstance(cfg.data.train[0], DataSource)
    got = [(s.name, s.weight, s.format, s.max_samples, s.epochs) for s in sources_of(cfg.data)]
    assert got == [
        ("rag", 3.0, "sft-rag", 0, 0),
        ("general", 1.0, "messages", 100, 2),
        ("notes.v2", 1.0, "sft-rag", 0, 0),
    ]
    single = config_from_dict({"data": {"train": {"path": "rag.jsonl", "name": "kb"}}})
    assert [s.name for s in sources_of(single.data)] == ["kb"]
    # the snapshot reads back to the same config
    assert config_from_dict(__import__("yaml").safe_load(dump_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("rag.jsonl", "rag"),
        ("d/x.parquet", "x"),
        ("general/*.parquet", "general"),
        ("corpus/", "corpus"),
        ("*.jsonl", ""),
    ],
)
def test_default_names(path, name):
    assert default_name(path) == name


def test_each_problem_names_its_source():
    found = problems(
        {
            "data": {
                "format": "preference",
                "train": [
                    {"path": "rag.jsonl", "wieght": 3},
                    5,
                    {"path": "a.jsonl", "name": "a b", "format": "messages", "weight": 0},
                    {"path": "rag.json", "epochs": -1},
                    {"path": "*.jsonl", "format": "sft-rag"},
                ],
            },
            "objective": {"name": "dpo"},
        }
    )
    assert found[0] == "data.train[0].wieght: unknown key (did you mean 'data.train[0].weight'?)"
    assert found[1].startswith("data.train[1]: expected a string or a mapping {path, name, weight, format,")
    # the checks run once the types are right
    found = problems(
        {
            "data": {
                "format": "preference",
                "train": [
                    {"path": "rag.jsonl"},
                    {"path": "a.jsonl", "name": "a b", "format": "messages", "weight": 0},
                    {"path": "rag.json", "epochs": -1},
                    {"path": "*.jsonl", "format": "sft-rag"},
                ],
            },
            "objective": {"name": "dpo"},
        }
    )
    assert any(p.startswith("data.train[1].name: 'a b' is not usable as a metric key") for p in found)
    assert "data.train[1].weight: must be > 0 (a relative sampling rate in records), got 0.0" in found
    assert "data.train[2].epochs: must be >= 0 (0: no limit), got -1" in found
    assert any(
        p.startswith("data.train[2]: source name 'rag' is already the name of data.train[0]") for p in found
    )
    assert any(p.startswith("data.train[3].name: '*.jsonl' gives no name") for p in found)
    formats = [p for p in found if "trains on preference records" in p]
    assert formats == [
        "data.train: objective.name 'dpo' trains on preference records; source(s) a b (messages), *.jsonl (sft-rag) "
        "hold other records: drop them from the mixture, or train them with objective.name=sft"
    ]


def test_a_preference_objective_with_an_sft_source_is_one_problem():
    found = problems(
        {
            "data": {
                "format": "preference",
                "train": [{"path": "ddr.jsonl"}, {"path": "g.jsonl", "format": "sft-rag"}],
            },
            "objective": {"name": "dpo"},
        }
    )
    assert found == [
        "data.train: objective.name 'dpo' trains on preference records; source(s) g (sft-rag) hold other "
        "records: drop them from the mixture, or train them with objective.name=sft"
    ]


def test_weights_whose_ratio_needs_a_long_period_are_refused():
    found = problems(
        {"data": {"train": [{"path": "a.jsonl", "weight": 0.3333333333333333}, {"path": "b.jsonl"}]}}
    )
    assert len(found) == 1 and "write them as small whole numbers or short decimals" in found[0]


def test_a_mixture_with_a_data_snapshot_is_one_clear_refusal():
    raw = {"data": {"snapshot": "link", "train": [{"path": "a.jsonl", "weight": 3}, {"path": "b.jsonl"}]}}
    assert any("data.snapshot=link takes a plain list of data.train paths" in p for p in problems(raw))
