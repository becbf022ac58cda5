"""ZeRO JSON: packaged configs resolve, "auto" arithmetic, every contradiction reported at once."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import pytest

from dstrain.config.run import DataConfig, ModelConfig, RunConfig, TrainConfig
from dstrain.config.zero import (
    BatchPlan,
    find_autos,
    find_ds_config,
    load_ds_config,
    resolve_ds_config,
    zero_stage,
)
from dstrain.errors import ConfigError

SHIPPED = sorted(
    p.name for p in (resources.files("dstrain") / "ds_configs").iterdir() if p.name.endswith(".json")
)


def _cfg(**train) -> RunConfig:
    return RunConfig(data=DataConfig(train=["unused.jsonl"]), train=TrainConfig(**train))


def _shipped(name: str = "zero2.json") -> dict:
    return load_ds_config(find_ds_config(f"ds_configs/{name}"))


def _minimal(**over) -> dict:
    ds = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2},
    }
    ds.update(over)
    return ds


def _problems(
    raw: dict, cfg: RunConfig | None = None, world: int = 1, total_steps: int = 100, **kw
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resolve_ds_config(raw, cfg or _cfg(), world, total_steps, **kw)
    return info.value.problems


def test_all_four_configs_are_shipped():
    assert SHIPPED == ["zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("world", [1, 2])
def test_every_shipped_config_resolves(name: str, world: int):
    raw = _shipped(name)
    before = copy.deepcopy(raw)
    ds, plan = resolve_ds_config(raw, _cfg(), world, total_steps=100, hidden_size=128)
    assert raw == before, "resolve must not modify its input"
    assert find_autos(ds) == []
    assert "auto" not in json.dumps(ds)
    assert plan.world == world
    assert ds["train_batch_size"] == plan.micro * plan.accumulation * world == plan.global_batch
    assert ds["train_micro_batch_size_per_gpu"] == plan.micro == 4
    assert ds["gradient_accumulation_steps"] == plan.accumulation == 1
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert zero_stage(ds) == (3 if name.startswith("zero3") else 2)
    if zero_stage(ds) == 3:
        zero = ds["zero_optimization"]
        assert zero["reduce_bucket_size"] == 128 * 128
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 128 * 128)
        assert zero["stage3_param_persistence_threshold"] == 10 * 128


def test_bf16_auto_follows_model_dtype():
    cfg = _cfg()
    cfg.model = ModelConfig(dtype="bf16")
    ds, _ = resolve_ds_config(_shipped(), cfg, 1, 100)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_auto_train_batch_size_is_micro_times_accum_times_world():
    raw = _minimal(gradient_accumulation_steps=3)
    for world in (1, 2, 8):
        ds, plan = resolve_ds_config(raw, _cfg(), world, 100)
        assert plan == BatchPlan(4, 3, world)
        assert ds["train_batch_size"] == 4 * 3 * world


@pytest.mark.parametrize(("world", "accumulation"), [(1, 4), (2, 2), (4, 1)])
def test_global_batch_size_sets_accumulation(world: int, accumulation: int):
    ds, plan = resolve_ds_config(_shipped(), _cfg(global_batch_size=16), world, 100)
    assert plan == BatchPlan(4, accumulation, world)
    assert ds["gradient_accumulation_steps"] == accumulation
    assert ds["train_batch_size"] == 16


def test_explicit_batch_that_does_not_add_up_lists_the_numbers():
    problems = _problems(_minimal(train_batch_size=10), world=2)
    assert len(problems) == 1
    msg = problems[0]
    assert "train_batch_size=10" in msg
    assert "micro 4" in msg and "accumulation 1" in msg and "world size 2" in msg and "= 8" in msg


def test_explicit_batch_with_explicit_accumulation_that_does_not_add_up():
    problems = _problems(_minimal(train_batch_size=16, gradient_accumulation_steps=3), world=1)
    assert len(problems) == 1
    assert "train_batch_size=16" in problems[0] and "= 12" in problems[0]


def test_global_batch_size_smaller_than_micro_times_world():
    problems = _problems(_shipped(), _cfg(global_batch_size=4), world=2)
    assert len(problems) == 1
    assert "train_batch_size=4" in problems[0] and "= 8" in problems[0]


def test_global_batch_size_contradicting_the_json():
    problems = _problems(_minimal(train_batch_size=8), _cfg(global_batch_size=16), world=2)
    assert any("train.global_batch_size=16 contradicts train_batch_size=8" in p for p in problems)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "four"])
def test_micro_batch_must_be_a_positive_integer(bad):
    problems = _problems(_minimal(train_micro_batch_size_per_gpu=bad))
    assert len(problems) == 1
    assert problems[0].startswith("train_micro_batch_size_per_gpu: must be a positive integer")


def test_all_problems_at_once():
    raw = _minimal(train_batch_size=10, bf16={"enabled": True})
    del raw["optimizer"]
    problems = _problems(raw, world=2)
    assert len(problems) == 3, problems
    assert "train_batch_size=10" in problems[0]
    assert problems[1].startswith("bf16.enabled=True in the ZeRO JSON contradicts model.dtype=fp32")
    assert problems[2].startswith("optimizer: the ZeRO JSON must name an optimizer")


def test_all_problems_at_once_with_a_shipped_scheduler():
    raw = _shipped()
    raw["train_batch_size"] = 10
    raw["bf16"] = {"enabled": True}
    del raw["optimizer"]
    problems = _problems(raw, world=2)
    assert len(problems) == 3, problems


def test_json_without_precision_sections_means_fp32():
    raw = _minimal()
    del raw["bf16"], raw["fp16"]
    ds, _ = resolve_ds_config(raw, _cfg(), 1, 100)
    assert not ds.get("bf16", {}).get("enabled", False)
    assert not ds.get("fp16", {}).get("enabled", False)


def test_fp16_on_a_device_without_fp16():
    cfg = _cfg()
    cfg.model = ModelConfig(dtype="fp16")
    problems = _problems(_shipped(), cfg, fp16_ok=False)
    assert len(problems) == 1
    assert "fp16" in problems[0] and "no fp16" in problems[0]
    # the same config is fine where fp16 works
    ds, _ = resolve_ds_config(_shipped(), cfg, 1, 100, fp16_ok=True)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False


def test_bf16_on_a_device_without_bf16():
    cfg = _cfg()
    cfg.model = ModelConfig(dtype="bf16")
    problems = _problems(_shipped(), cfg, bf16_ok=False)
    assert problems == ["model.dtype=bf16 but this device has no bf16 support: use fp16 or fp32"]


def test_offload_param_needs_stage_3():
    raw = _shipped("zero3_offload.json")
    raw["zero_optimization"]["stage"] = 2
    problems = _problems(raw)
    assert any(p.startswith("zero_optimization.offload_param needs stage 3") for p in problems), problems


def test_bad_zero_stage():
    problems = _problems(_minimal(zero_optimization={"stage": 4}))
    assert problems == ["zero_optimization.stage: must be 0, 1, 2 or 3, got 4"]


@pytest.mark.parametrize("total_steps", [1, 40, 100, 1000])
def test_scheduler_autos_filled_from_total_steps(total_steps: int):
    ds, _ = resolve_ds_config(_shipped(), _cfg(), 1, total_steps)
    params = ds["scheduler"]["params"]
    # the decay ends one iteration after the last update's (training/schedule.py): no update at the minimum
    assert params["total_num_steps"] == total_steps + 1
    assert params["warmup_num_steps"] == max(1, -(-total_steps * 5 // 100))
    assert params["warmup_max_lr"] == ds["optimizer"]["params"]["lr"] == 2e-4
    assert params["warmup_min_lr"] == 0.0  # explicit values are kept


def test_cosine_auto_end_leaves_the_last_update_above_the_minimum():
    raw = _shipped()
    raw["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": "auto", "warmup_num_steps": 2},
    }
    ds, _ = resolve_ds_config(raw, _cfg(), 1, 20)
    assert ds["scheduler"]["params"]["total_num_steps"] == 22  # DeepSpeed's cosine ends one iteration early


def test_an_explicit_total_shorter_than_the_run_is_refused_naming_both():
    raw = _shipped()
    raw["scheduler"]["params"]["total_num_steps"] = 50
    problems = _problems(raw, total_steps=80)
    assert any("total_num_steps=50" in p and "(80 steps)" in p for p in problems), problems
    resolve_ds_config(raw, _cfg(), 1, 80, check_length=False)  # a resume keeps its plan by choice
    resolve_ds_config(raw, _cfg(), 1, 50)  # as long as the run: the user asked for it


def test_explicit_scheduler_values_are_kept():
    raw = _shipped()
    raw["scheduler"]["params"]["warmup_num_steps"] = 7
    ds, _ = resolve_ds_config(raw, _cfg(), 1, 100)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 7


def test_bad_learning_rate():
    problems = _problems(_minimal(optimizer={"type": "AdamW", "params": {"lr": "fast"}}))
    assert problems == ["optimizer.params.lr: must be a non-negative number, got 'fast'"]


def test_unfillable_auto_is_reported_with_its_path():
    raw = _minimal(gradient_clipping="auto", zero_optimization={"stage": 2, "allgather_bucket_size": "auto"})
    problems = _problems(raw)
    assert sorted(problems) == sorted(
        [
            'gradient_clipping: "auto" has no value dstrain can fill; set it explicitly',
            'zero_optimization.allgather_bucket_size: "auto" has no value dstrain can fill; set it explicitly',
        ]
    )


def test_find_packaged_config_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    path = find_ds_config("ds_configs/zero3.json")
    assert path.is_file()
    assert path.name == "zero3.json"
    assert zero_stage(load_ds_config(path)) == 3


def test_local_config_wins_over_the_packaged_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_configs").mkdir()
    local = tmp_path / "ds_configs" / "zero3.json"
    local.write_text(json.dumps(_minimal()), encoding="utf-8")
    assert find_ds_config("ds_configs/zero3.json") == local.resolve()


def test_missing_config_lists_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        find_ds_config("ds_configs/zero9.json")
    (problem,) = info.value.problems
    assert "zero9.json" in problem and "not found" in problem
    for name in SHIPPED:
        assert name in problem


def test_missing_absolute_path_is_not_replaced_by_a_packaged_one(tmp_path: Path):
    with pytest.raises(ConfigError):
        find_ds_config(str(tmp_path / "zero2.json"))


def test_invalid_json_reports_path_line_col(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {enabled: true}\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_ds_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:3:12: not valid JSON")


def test_json_top_level_must_be_an_object(tmp_path: Path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_ds_config(path)
    assert info.value.problems == [f"{path}: top level must be a JSON object"]


def test_json_with_bom(tmp_path: Path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_minimal()).encode())
    assert load_ds_config(path)["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("name", ["Lamb", "Muon", "OneBitAdam"])
def test_an_optimizer_other_than_adam_is_refused(name):
    """The checkpoint holds Adam's moments (exp_avg, exp_avg_sq): another optimizer would fail at the first
    save or resume inexactly, so it is refused at load."""
    raw = _minimal()
    raw["optimizer"]["type"] = name
    problems = _problems(raw)
    assert len(problems) == 1 and problems[0].startswith(f"optimizer.type={name!r} in the ZeRO JSON"), (
        problems
    )


@pytest.mark.parametrize("name", ["Adam", "adamw", "AdamW"])
def test_adam_and_adamw_in_any_case_are_taken(name):
    raw = _minimal()
    raw["optimizer"]["type"] = name
    resolve_ds_config(raw, _cfg(), 1, 100)  # no ConfigError
