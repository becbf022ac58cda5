"""What `dstrain eval PATH` evaluates, and the model loaded as the run had it.

PATH is one of:
- a run dir (its newest valid checkpoint) or a checkpoint dir: the checkpoint's config snapshot says
  everything (base, dtype, 4-bit, head, tokenisation, objective), read as `dstrain resume` reads it;
- an adapter dir (`dstrain export`: adapter_config.json, no manifest): the base is the one its
  adapter_config.json names; the rest comes from `--config RUN.yaml` (the run's config.yaml reproduces the
  run) or from dstrain's defaults;
- a model dir (`dstrain export --merge`: config.json, no adapter): that model, in the dtype its config.json
  names, the rest as for an adapter dir. It has no reference model left to compare with, so preference
  metrics are refused for it.
`--set KEY=VALUE` then changes any key (e.g. model.dtype, data.max_seq_len).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from dstrain.checkpoint import layout, load
from dstrain.checkpoint.resume import keep_written_behaviour
from dstrain.config.run import RunConfig, apply_overrides, config_from_dict, config_to_dict, read_yaml
from dstrain.errors import ConfigError, DstrainError

CHECKPOINT, ADAPTER, MERGED = "checkpoint", "adapter", "merged model"
DEFAULT_MICRO = 4  # eval rows per forward when nothing says what the run used
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class EvalSource:
    kind: str  # CHECKPOINT, ADAPTER or MERGED
    path: Path  # the checkpoint, adapter or model dir that is evaluated
    cfg: RunConfig
    micro: int  # rows per forward: the run's micro batch where it is known
    step: int | None = None  # a checkpoint's step
    run_dir: Path | None = (
        None  # the run a checkpoint belongs to (its metrics.jsonl), unless --set changed it
    )
    notes: list[str] = field(default_factory=list)


def find_source(path: Path, config: Path | None, overrides: list[str]) -> EvalSource:
    """Which of the four PATH is, with the config to evaluate it under."""
    path = Path(path)
    if not path.exists():
        raise DstrainError(
            f"{path}: no such file or directory; give a run dir, a checkpoint, an adapter dir or a model dir"
        )
    if is_run_or_checkpoint(path):
        if config is not None:
            raise ConfigError(
                [
                    f"--config: {path} is a run or checkpoint, whose own config snapshot is used; change keys with --set"
                ]
            )
        return checkpoint_source(path, overrides)
    if (path / "adapter_config.json").is_file():
        return exported_source(ADAPTER, path, config, overrides)
    if (path / "config.json").is_file():
        return exported_source(MERGED, path, config, overrides)
    raise DstrainError(
        f"{path}: not a run dir (checkpoints/), a checkpoint (manifest.json), an adapter dir "
        "(adapter_config.json, from `dstrain export`) or a model dir (config.json, from `dstrain export --merge`)"
    )


def is_run_or_checkpoint(path: Path) -> bool:
    if load.is_checkpoint_dir(path) or path.name == "checkpoints":
        return True
    return layout.checkpoints_dir(path).is_dir() or (path / "config.yaml").is_file()


def checkpoint_source(path: Path, overrides: list[str]) -> EvalSource:
    found = load.find_checkpoint(path)
    ckpt = found.path
    try:
        raw = yaml.safe_load(load.read_config_yaml(ckpt)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{ckpt}/config.yaml: not valid YAML ({exc})"]) from None
    keep_written_behaviour(raw)  # tokenised as the run tokenised (defaults of the dstrain that wrote it)
    apply_overrides(raw, overrides)
    cfg = config_from_dict(raw, source=f"{ckpt}/config.yaml")
    micro = load.read_ds_resolved(ckpt).get("train_micro_batch_size_per_gpu", DEFAULT_MICRO)
    step = load.read_trainer_state(ckpt).step
    # its metrics.jsonl is compared with only when nothing was changed with --set
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" and not overrides else None
    return EvalSource(CHECKPOINT, ckpt, cfg, int(micro), step, run_dir, list(found.notes))


def exported_source(kind: str, path: Path, config: Path | None, overrides: list[str]) -> EvalSource:
    """An adapter or merged model dir: --config, else defaults, with the model taken from the dir."""
    raw: dict[str, Any] = read_yaml(config) if config is not None else {}
    keys = {item.partition("=")[0].strip() for item in overrides}
    model = raw.setdefault("model", {})
    if kind == MERGED:
        model["path"] = str(path)
        if config is None and "model.dtype" not in keys and (dtype := saved_dtype(path)):
            model["dtype"] = dtype
    elif config is None:
        model["path"] = adapter_base(path)
    # the config's data.train is required of a run; an eval reads only --data
    raw.setdefault("data", {}).setdefault("train", ["(not read by dstrain eval)"])
    apply_overrides(raw, overrides)
    if kind == MERGED:
        raw["model"]["path"] = str(path)  # the dir is the model, whatever else was said
    cfg = config_from_dict(raw, source=str(config) if config else "eval config")
    return EvalSource(kind, path, cfg, configured_micro(cfg))


def adapter_base(path: Path) -> str:
    """The base model an exported adapter names (adapter_config.json's base_model_name_or_path)."""
    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError) as exc:
        raise DstrainError(f"{path / 'adapter_config.json'}: unreadable ({exc})") from None
    if not base:
        raise DstrainError(f"{path / 'adapter_config.json'} names no base model: pass --set model.path=DIR")
    return str(base)


def saved_dtype(path: Path) -> str | None:
    """The dtype a merged model was saved in (config.json), in the run config's spelling."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: transformers says why when it loads the model
    return DTYPE_NAMES.get(str(raw.get("dtype") or raw.get("torch_dtype"))) if isinstance(raw, dict) else None


def configured_micro(cfg: RunConfig) -> int:
    """The micro batch of the config's ZeRO JSON when it is a number, else DEFAULT_MICRO."""
    from dstrain.config.zero import find_ds_config, load_ds_config

    try:
        micro = load_ds_config(find_ds_config(cfg.ds_config)).get("train_micro_batch_size_per_gpu")
    except DstrainError:
        return DEFAULT_MICRO
    return micro if isinstance(micro, int) and not isinstance(micro, bool) and micro > 0 else DEFAULT_MICRO


class WithoutAdapter(nn.Module):
    """A merged model where the eval path expects a PeftModel: the adapter is inside its weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def get_base_model(self) -> nn.Module:
        return self.model

    def generate(self, **kwargs: Any) -> Any:
        return self.model.generate(**kwargs)


def load_policy(source: EvalSource) -> nn.Module:
    """The base as the run loaded it (model/build.py: dtype, 4-bit, attention) with the adapter PEFT loads
    from the dir, or the merged model alone."""
    from peft import PeftModel

    from dstrain.model.build import check_model_path, load_base_model

    problems = check_model_path(source.cfg.model)
    if problems:
        raise ConfigError(problems, source=f"the model of {source.path}")
    base = load_base_model(source.cfg.model)
    if source.kind == MERGED:
        return WithoutAdapter(base)
    return PeftModel.from_pretrained(base, str(source.path))


def describe(source: EvalSource) -> dict[str, Any]:
    """What the report records of the source: kind, dir, step, and the model and data settings used."""
    cfg = config_to_dict(source.cfg)
    return {
        "kind": source.kind,
        "path": str(source.path),
        "step": source.step,
        "model": {
            k: cfg["model"][k] for k in ("path", "dtype", "load_in_4bit", "head", "logits_chunk_tokens")
        },
        "objective": cfg["objective"],
        "data": {k: cfg["data"][k] for k in ("format", "max_seq_len", "max_passage_tokens", "chat_template")},
    }
