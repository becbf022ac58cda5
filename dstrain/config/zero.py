"""Load the ZeRO JSON, fill its "auto" values from the run config and world size, and validate both together.

Every contradiction is collected and raised as one `ConfigError` before any process group starts, so a
16-node job fails in seconds on the login node instead of minutes later on every rank.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dstrain.config.run import RunConfig
from dstrain.errors import ConfigError
from dstrain.model.quant import check_qlora

AUTO = "auto"
PACKAGED_DIR = "ds_configs"


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is cut: global = micro x accumulation x world.

    `world` counts data-parallel ranks: with sequence parallelism (train.sequence_parallel_size N) the
    `sequence` ranks of a group share each micro batch, so `world` is the number of ranks / N.
    """

    micro: int
    accumulation: int
    world: int
    sequence: int = 1

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world

    @property
    def devices(self) -> int:
        """Every rank of the run (data-parallel ranks x sequence-parallel size)."""
        return self.world * self.sequence


def data_parallel_world(cfg: RunConfig, world: int) -> int:
    """The ranks that read different micro batches: the world over the sequence-parallel size."""
    return max(1, world // max(1, cfg.train.sequence_parallel_size))


def find_ds_config(name: str) -> Path:
    """Look `name` up in the current directory, then among the ZeRO JSONs shipped in the package."""
    local = Path(name).expanduser()
    if local.is_file():
        return local.resolve()
    packaged = resources.files("dstrain") / PACKAGED_DIR / Path(name).name
    if not local.is_absolute() and packaged.is_file():
        return Path(str(packaged))
    shipped = ", ".join(sorted(p.name for p in (resources.files("dstrain") / PACKAGED_DIR).iterdir()))
    raise ConfigError([f"ds_config: {name}: file not found here or among the shipped configs ({shipped})"])


def load_ds_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})"], "ZeRO JSON"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a JSON object"], "ZeRO JSON")
    return raw


def plan_batch(ds: dict[str, Any], cfg: RunConfig, world: int, problems: list[str]) -> BatchPlan:
    """Solve train_batch_size = micro x accumulation x world for the "auto" entries (`world`: the
    data-parallel ranks, see data_parallel_world)."""
    micro = ds.get("train_micro_batch_size_per_gpu", AUTO)
    accum = ds.get("gradient_accumulation_steps", AUTO)
    total = ds.get("train_batch_size", AUTO)
    if total == AUTO and cfg.train.global_batch_size:
        total = cfg.train.global_batch_size
    elif total != AUTO and cfg.train.global_batch_size and total != cfg.train.global_batch_size:
        problems.append(
            f"train.global_batch_size={cfg.train.global_batch_size} contradicts train_batch_size={total} in "
            'the ZeRO JSON: set one of them (or make the JSON value "auto")'
        )
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", accum),
        ("train_batch_size", total),
    ):
        if value != AUTO and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f'{key}: must be a positive integer or "auto", got {value!r}')
            return BatchPlan(1, 1, world)
    if micro == AUTO:
        micro = 1 if accum == AUTO or total == AUTO else total // (accum * world) or 1
    if accum == AUTO:
        accum = 1 if total == AUTO else max(1, total // (micro * world))
    if total == AUTO:
        total = micro * accum * world
    plan = BatchPlan(micro, accum, world)
    if plan.global_batch != total:
        problems.append(
            f"batch sizes do not add up: train_batch_size={total} but micro {micro} x accumulation {accum} x "
            f"world size {world} = {plan.global_batch}; make train_batch_size a multiple of micro x world "
            f'({micro * world}) or set gradient_accumulation_steps to "auto"'
        )
    return plan


def resolve_precision(
    ds: dict[str, Any], cfg: RunConfig, bf16_ok: bool, fp16_ok: bool, problems: list[str]
) -> None:
    for key, want in (("bf16", cfg.model.dtype == "bf16"), ("fp16", cfg.model.dtype == "fp16")):
        section = ds.setdefault(key, {})
        enabled = section.setdefault("enabled", False)
        if enabled == AUTO:
            section["enabled"] = want
        elif bool(enabled) != want:
            problems.append(
                f"{key}.enabled={enabled} in the ZeRO JSON contradicts model.dtype={cfg.model.dtype}: set it to "
                '"auto" or make the two agree'
            )
    if ds["bf16"]["enabled"] and not bf16_ok:
        problems.append("model.dtype=bf16 but this device has no bf16 support: use fp16 or fp32")
    if ds["fp16"]["enabled"] and not fp16_ok:
        problems.append(
            "model.dtype=fp16 but this device has no fp16 training support (CPU): use bf16 or fp32"
        )


def resolve_zero(ds: dict[str, Any], hidden_size: int | None, problems: list[str]) -> None:
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 0 and (ds.get("fp16") or {}).get("enabled") is True:
        problems.append(
            "fp16 without ZeRO (zero_optimization.stage 0) keeps its fp32 master weights where checkpoints "
            "cannot read them: use stage 1, 2 or 3, or bf16"
        )
    if (zero.get("offload_param") or {}).get("device", "none") != "none" and stage != 3:
        problems.append(
            "zero_optimization.offload_param needs stage 3 (parameters are only partitioned there)"
        )
    # The same defaults transformers' integration derives from the hidden size.
    hidden = hidden_size or 1024
    derived = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in derived.items():
        if zero.get(key) == AUTO:
            zero[key] = value


def resolve_sequence_parallel(ds: dict[str, Any], cfg: RunConfig, world: int, problems: list[str]) -> None:
    """With train.sequence_parallel_size N > 1: N divides the world; the JSON carries N; ZeRO-3 reduces
    gradients on the path that is right under sequence parallelism.

    DeepSpeed 0.19.8's ZeRO-3 reduce-scatter path averages gradients over all ranks, not over the
    data-parallel groups (gradients N times too small); its contiguous-gradient path does it right. So
    reduce_scatter is set false and contiguous_gradients true (setup checks reduce_bucket_size against the
    largest trainable tensor, which would otherwise still take the wrong path).
    """
    size = cfg.train.sequence_parallel_size
    if size <= 1:
        return
    if world % size:
        problems.append(
            f"train.sequence_parallel_size={size} does not divide the world size {world}: use a divisor of it"
        )
    if cfg.data.packing and cfg.model.attn_implementation == "flash_attention_2":
        problems.append(
            "train.sequence_parallel_size: a flat packed row (data.packing with flash_attention_2) cannot be "
            "split along its length yet; use model.attn_implementation=sdpa, or set data.packing=false"
        )
    # read by DeepSpeedConfig where no mpu is given (zero.Init): data-parallel world = world / N
    ds["sequence_parallel_size"] = size
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) != 3:
        return
    if zero.get("reduce_scatter") is True or zero.get("contiguous_gradients") is False:
        problems.append(
            "zero_optimization: ZeRO-3 with train.sequence_parallel_size > 1 needs reduce_scatter false and "
            "contiguous_gradients true (DeepSpeed's reduce-scatter path scales gradients wrongly under "
            "sequence parallelism); remove the two keys and dstrain sets them"
        )
    zero["reduce_scatter"], zero["contiguous_gradients"] = False, True


ADAM_TYPES = ("adam", "adamw")  # DeepSpeed's optimizer names (any case) whose state dstrain checkpoints

# Iterations from the last update's to the end of each decay: DeepSpeed's linear decay reaches its minimum
# at total_num_steps, its cosine one iteration earlier. "auto" ends the plan just after the last update, so
# that update still trains above the minimum (update k uses iteration k: training/schedule.py).
END_AFTER_LAST = {"WarmupDecayLR": 1, "WarmupCosineLR": 2}


def resolve_schedule(
    ds: dict[str, Any], total_steps: int, problems: list[str], check_length: bool = True
) -> None:
    """Fill the scheduler's "auto" numbers from the run's length and the optimizer's LR; with
    `check_length`, an explicit total_num_steps shorter than the run is a problem (its tail would train at
    the minimum LR without a word). A resume keeps the plan it started with (checkpoint/resume.py)."""
    scheduler = ds.get("scheduler") or {}
    params = scheduler.get("params", {})
    fills: dict[str, Any] = {
        "total_num_steps": total_steps + END_AFTER_LAST.get(scheduler.get("type", ""), 1),
        "warmup_num_steps": max(1, math.ceil(0.05 * total_steps)),  # 5% warmup when "auto"
        "cos_min_ratio": 0.0,
    }
    optimizer = ds.get("optimizer")
    lr = optimizer.get("params", {}).get("lr") if isinstance(optimizer, dict) else None
    if not isinstance(optimizer, dict) or "type" not in optimizer:
        problems.append('optimizer: the ZeRO JSON must name an optimizer, e.g. {"type": "AdamW", ...}')
    elif str(optimizer["type"]).lower() not in ADAM_TYPES:
        problems.append(
            f'optimizer.type={optimizer["type"]!r} in the ZeRO JSON: dstrain trains with Adam ("Adam" or '
            '"AdamW"); its checkpoints hold Adam\'s two moments per parameter, which resume needs exactly'
        )
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
        problems.append(f"optimizer.params.lr: must be a non-negative number, got {lr!r}")
    else:
        fills["warmup_max_lr"] = lr
    explicit = params.get("total_num_steps")
    if (
        check_length
        and isinstance(explicit, int)
        and not isinstance(explicit, bool)
        and explicit < total_steps
    ):
        problems.append(
            f"scheduler.params.total_num_steps={explicit} in the ZeRO JSON is shorter than the run "
            f"({total_steps} steps): its last {total_steps - explicit} steps would train at the schedule's "
            "minimum LR. Set it to \"auto\" (the run's length), or to at least the run's length, or lower "
            "train.max_steps/epochs"
        )
    for key, value in fills.items():
        if params.get(key) == AUTO:
            params[key] = value
    if "warmup_max_lr" not in fills and params.get("warmup_max_lr") == AUTO:
        params.pop("warmup_max_lr")  # the optimizer problem above already says it; do not report it twice


def find_autos(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in find_autos(v, f"{path}.{k}" if path else k)]
    return [path] if node == AUTO else []


def resolve_ds_config(
    raw: dict[str, Any],
    cfg: RunConfig,
    world: int,
    total_steps: int,
    hidden_size: int | None = None,
    bf16_ok: bool = True,
    fp16_ok: bool = True,
    check_length: bool = True,
) -> tuple[dict[str, Any], BatchPlan]:
    """Return a copy of `raw` with every "auto" filled, or raise one ConfigError listing every problem.
    `check_length`: compare explicit scheduler step counts with `total_steps` (off on resume: the
    checkpoint's plan is kept, or stretched, by choice)."""
    ds = copy.deepcopy(raw)
    problems: list[str] = []
    plan = plan_batch(ds, cfg, data_parallel_world(cfg, world), problems)
    plan = BatchPlan(plan.micro, plan.accumulation, plan.world, cfg.train.sequence_parallel_size)
    ds["train_micro_batch_size_per_gpu"] = plan.micro
    ds["gradient_accumulation_steps"] = plan.accumulation
    ds["train_batch_size"] = plan.global_batch
    resolve_precision(ds, cfg, bf16_ok, fp16_ok, problems)
    resolve_zero(ds, hidden_size, problems)
    resolve_sequence_parallel(ds, cfg, world, problems)
    resolve_schedule(ds, total_steps, problems, check_length)
    problems += check_qlora(cfg, ds)
    problems += [f'{key}: "auto" has no value dstrain can fill; set it explicitly' for key in find_autos(ds)]
    if problems:
        raise ConfigError(problems, source="ZeRO JSON")
    return ds, plan


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
