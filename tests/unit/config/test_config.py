"""Run config: defaults, strict keys, every problem at once, `--set` overrides, YAML errors, range checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstrain.config.run import (
    DEFAULT_TEMPLATE,
    RunConfig,
    config_from_dict,
    dump_yaml,
    load_config,
)
from dstrain.errors import ConfigError, DstrainError

TRAIN = ["data/train.jsonl"]


def _problems(raw: dict | None = None, overrides: list[str] | None = None, path: Path | None = None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, base=raw)
    return info.value.problems


def _valid(**sections) -> dict:
    raw = {"data": {"train": TRAIN}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


# ------------------------------------------------------------------------------------------- defaults


def test_defaults_with_train_data_validate():
    cfg = load_config(None, ["data.train=data/train.jsonl"])
    assert isinstance(cfg, RunConfig)
    assert cfg.data.train == TRAIN
    assert cfg.model.path == "builtin:tiny"
    assert cfg.model.dtype == "fp32"
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.data.format == "sft-rag"
    assert cfg.data.on_error == "fail"
    assert cfg.data.prompt_template == DEFAULT_TEMPLATE
    assert cfg.objective.name == "sft"
    assert cfg.ds_config == "ds_configs/zero2.json"


def test_defaults_without_train_data_are_rejected():
    problems = _problems({})
    assert len(problems) == 1
    assert problems[0].startswith("data.train:")


def test_config_error_is_a_user_error_with_a_count():
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, source="my.yaml")
    assert isinstance(info.value, DstrainError)
    assert str(info.value).startswith("invalid my.yaml: 1 problem\n")


def test_dump_yaml_round_trips(tmp_path: Path):
    cfg = load_config(None, base=_valid(lora={"r": 4}, data={"train": ["a.jsonl", "b/*.jsonl"]}))
    path = tmp_path / "snapshot.yaml"
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


# ---------------------------------------------------------------------------------------- strict keys


def test_unknown_key_suggests_the_close_one_with_dotted_path():
    problems = _problems(_valid(lora={"dropuot": 0.1}))
    assert problems == ["lora.dropuot: unknown key (did you mean 'lora.dropout'?)"]


def test_unknown_nested_key_in_yaml_file(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: [a.jsonl]\n  max_seq_length: 256\n", encoding="utf-8")
    problems = _problems(path=path)
    assert len(problems) == 1
    assert problems[0].startswith("data.max_seq_length: unknown key")
    assert "did you mean 'data.max_seq_len'" in problems[0]


def test_unknown_section_lists_known_sections():
    problems = _problems(_valid(nonsense={"a": 1}))
    assert len(problems) == 1
    assert problems[0].startswith("nonsense: unknown key")
    for name in ("model", "lora", "data", "objective", "train", "ds_config", "output_dir"):
        assert name in problems[0]


def test_every_type_error_in_one_file_is_reported_at_once(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n"
        "  dtype: fp64\n"
        "lora:\n"
        "  r: sixteen\n"
        "  dropuot: 0.1\n"
        "data:\n"
        "  train: [a.jsonl]\n"
        "  max_seq_len: 1.5\n"
        "  packing: 'yes'\n"
        "train:\n"
        "  max_steps: true\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 6, problems
    joined = "\n".join(problems)
    assert "model.dtype: expected bf16 | fp16 | fp32, got str 'fp64'" in joined
    assert "lora.r: expected an integer, got str 'sixteen'" in joined
    assert "lora.dropuot: unknown key (did you mean 'lora.dropout'?)" in joined
    assert "data.max_seq_len: expected an integer, got float 1.5" in joined
    assert "data.packing: expected true|false, got str 'yes'" in joined
    assert "train.max_steps: expected an integer, got bool True" in joined
    assert str(path) in str(info.value)
    assert "6 problems" in str(info.value)


def test_section_that_is_not_a_mapping():
    problems = _problems(_valid() | {"lora": 5})
    assert problems == ["lora: expected a mapping, got int 5"]


def test_int_is_accepted_where_a_float_is_expected():
    cfg = load_config(None, base=_valid(lora={"dropout": 0}))
    assert cfg.lora.dropout == 0.0
    assert isinstance(cfg.lora.dropout, float)


# ------------------------------------------------------------------------------------------ overrides


def test_set_overrides_parse_scalars_and_lists():
    cfg = load_config(
        None,
        [
            "data.train=[a.jsonl, b.jsonl]",
            "train.max_steps=7",
            "lora.dropout=0.25",
            "data.chat_template=true",
            "lora.target_modules=[q_proj, v_proj]",
            "output_dir=runs/x",
        ],
    )
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.lora.dropout == 0.25
    assert cfg.data.chat_template is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.output_dir == "runs/x"


def test_single_string_becomes_a_one_element_list_for_data_train():
    cfg = load_config(None, ["data.train=shards/*.jsonl", "data.eval=eval.jsonl"])
    assert cfg.data.train == ["shards/*.jsonl"]
    assert cfg.data.eval == ["eval.jsonl"]


def test_set_overrides_win_over_the_file(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: a.jsonl\nlora:\n  r: 4\n", encoding="utf-8")
    cfg = load_config(path, ["lora.r=8", "data.max_seq_len=128", "data.max_passage_tokens=64"])
    assert cfg.lora.r == 8
    assert cfg.data.max_seq_len == 128
    assert cfg.data.train == ["a.jsonl"]


def test_set_value_with_equals_sign_keeps_the_rest():
    cfg = load_config(None, ["data.train=a.jsonl", "output_dir=runs/lr=1e-4"])
    assert cfg.output_dir == "runs/lr=1e-4"


def test_malformed_set_items_are_all_reported():
    problems = _problems(_valid(), ["novalue", "=3", "train.max_steps=5"])
    assert len(problems) == 2
    assert all("expected KEY=VALUE" in p for p in problems)
    assert "'novalue'" in problems[0]
    assert "'=3'" in problems[1]


def test_set_unknown_section():
    problems = _problems(_valid(), ["nosuch.key=1"])
    assert len(problems) == 1
    assert problems[0].startswith("nosuch: unknown key")


def test_set_misspelled_key_gets_a_suggestion():
    problems = _problems(_valid(), ["train.max_step=10"])
    assert problems == ["train.max_step: unknown key (did you mean 'train.max_steps'?)"]


def test_set_through_a_scalar_is_reported():
    problems = _problems(_valid() | {"output_dir": "runs/x"}, ["output_dir.sub=1"])
    assert len(problems) == 1
    assert "output_dir is not a section" in problems[0]
    # without the scalar in the file, the created mapping is caught by the type check instead
    problems = _problems(_valid(), ["output_dir.sub=1"])
    assert problems == ["output_dir: expected a string, got dict {'sub': 1}"]


def test_set_value_that_is_not_yaml_is_a_config_error_not_a_traceback():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train=[a.jsonl"])
    assert len(info.value.problems) == 1
    assert "data.train" in info.value.problems[0]


def test_set_prompt_template_with_colons_keeps_the_text():
    template = "Context: {passages} Question: {query} Answer:"
    cfg = load_config(None, ["data.train=a.jsonl", f"data.prompt_template={template}"])
    assert cfg.data.prompt_template == template


def test_set_with_wrong_type_is_reported():
    problems = _problems(_valid(), ["lora.r=big"])
    assert problems == ["lora.r: expected an integer, got str 'big'"]


# ------------------------------------------------------------------------------------------ YAML file


def test_yaml_file_not_found(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    problems = _problems(path=missing)
    assert len(problems) == 1
    assert str(missing) in problems[0]
    assert "file not found" in problems[0]


def test_invalid_yaml_reports_path_and_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: [a.jsonl\nlora:\n  r: 4\n", encoding="utf-8")
    problems = _problems(path=path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:")
    line = int(problems[0][len(str(path)) + 1 :].split(":", 1)[0])
    assert line in (3, 4)  # where the parser notices the unclosed flow sequence
    assert "not valid YAML" in problems[0]


def test_invalid_yaml_indentation_line_number(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: a.jsonl\n   seed: 3\n", encoding="utf-8")
    problems = _problems(path=path)
    assert problems[0].startswith(f"{path}:3:")


def test_yaml_top_level_must_be_a_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    problems = _problems(path=path)
    assert problems == [f"{path}: top level must be a mapping of sections, got list"]


def test_empty_yaml_file_means_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    cfg = load_config(path, ["data.train=a.jsonl"])
    assert cfg.data.train == ["a.jsonl"]


def test_yaml_with_bom_and_chinese(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_bytes("\ufeffdata:\n  train: [数据/训练.jsonl]\n".encode())
    assert load_config(path).data.train == ["数据/训练.jsonl"]


# ------------------------------------------------------------------------------------- range checks


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.r=0"], "lora.r: must be >= 1, got 0"),
        (["lora.dropout=1.0"], "lora.dropout: must be in [0, 1), got 1.0"),
        (["lora.dropout=-0.1"], "lora.dropout: must be in [0, 1), got -0.1"),
        (["data.max_bad_fraction=1.5"], "data.max_bad_fraction: must be in [0, 1], got 1.5"),
        (["data.num_workers=-1"], "data.num_workers: must be >= 0, got -1"),
        (["train.keep_last=0"], "train.keep_last: must be >= 1, got 0"),
        (["train.max_steps=0", "train.epochs=0"], "train: set max_steps or epochs"),
        (["lora.target_modules=everything"], "lora.target_modules: a list of module names or 'all-linear'"),
        (["data.prompt_template=Q {query} A"], "data.prompt_template: must contain {passages}"),
        (["output_dir=' '"], "output_dir: must not be empty"),
    ],
)
def test_range_checks(overrides: list[str], expected: str):
    problems = _problems(_valid(), overrides)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


@pytest.mark.parametrize("passage_tokens", [512, 600])
def test_max_passage_tokens_must_be_below_max_seq_len(passage_tokens: int):
    problems = _problems(_valid(), [f"data.max_passage_tokens={passage_tokens}", "data.max_seq_len=512"])
    assert len(problems) == 1
    assert f"data.max_passage_tokens ({passage_tokens}) must be below data.max_seq_len (512)" in problems[0]


def test_several_range_problems_are_reported_together():
    problems = _problems(_valid(), ["lora.r=0", "lora.dropout=1.0", "data.max_passage_tokens=600"])
    assert len(problems) == 3


def test_target_modules_all_linear_and_list():
    assert load_config(None, ["data.train=a", "lora.target_modules=all-linear"]).lora.target_modules == (
        "all-linear"
    )
    cfg = load_config(None, base=_valid(lora={"target_modules": ["q_proj", "k_proj", "v_proj"]}))
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj"]


def test_target_modules_list_of_non_strings_is_a_type_error():
    problems = _problems(_valid(lora={"target_modules": ["q_proj", 3]}))
    assert len(problems) == 1
    assert problems[0].startswith("lora.target_modules: expected a string or a list of a string")


def test_distributed_timeouts_are_checked_together():
    problems = _problems(
        _valid(distributed={"rendezvous_timeout_s": 0, "collective_timeout_s": -5, "heartbeat_timeout_s": 3})
    )
    assert len(problems) == 3
    assert any(p.startswith("distributed.rendezvous_timeout_s: must be >= 1") for p in problems)
    assert any(p.startswith("distributed.collective_timeout_s: must be >= 1") for p in problems)
    assert any("distributed.heartbeat_timeout_s: must be 0 (off) or >= 10, got 3" in p for p in problems)
    cfg = load_config(None, ["distributed.heartbeat_timeout_s=0"], base=_valid())
    assert cfg.distributed.heartbeat_timeout_s == 0 and cfg.distributed.rendezvous_timeout_s == 300


def test_listed_keys_name_real_config_fields():
    """Key lists spelled as strings (range checks, keys that may change on resume) against the dataclasses:
    a renamed or misspelled field fails here instead of silently never matching."""
    from dstrain.checkpoint.resume import MUTABLE
    from dstrain.config.checks import AT_LEAST_ONE, AT_LEAST_ZERO
    from dstrain.config.run import config_paths

    paths = config_paths()
    assert "data.max_seq_len" in paths and "output_dir" in paths and "data" not in paths
    for listed in (AT_LEAST_ONE, AT_LEAST_ZERO, MUTABLE):
        assert sorted(set(listed) - set(paths)) == []
        assert len(set(listed)) == len(listed)
