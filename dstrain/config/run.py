"""Typed, strict run config: YAML + `--set a.b=c` overrides, every problem reported at once.

The run config says *what* is trained (model, data, LoRA, objective, schedule, output). How it is optimised
(micro batch, accumulation, precision, optimizer, scheduler, offload) belongs to the ZeRO JSON: see
`config/zero.py`, which validates the two together.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dstrain.config.migrate import CONFIG_VERSION, upgrade
from dstrain.config.parse import build
from dstrain.config.sources import DataFormat, DataSource
from dstrain.errors import ConfigError

Dtype = Literal["bf16", "fp16", "fp32"]
ObjectiveName = Literal["sft", "dpo", "ipo", "simpo", "dpo_nll", "orpo", "kto"]

DEFAULT_TEMPLATE = "Background:\n{passages}\n\nQuestion: {query}\nAnswer:"


@dataclass
class ModelConfig:
    path: str = "builtin:tiny"
    dtype: Dtype = "fp32"
    # QLoRA: the frozen base in 4-bit NF4 with double quantisation (bitsandbytes), computed in `dtype`
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    # run the modeling code shipped in the model dir (a model class transformers does not have)
    trust_remote_code: bool = False
    # auto: what transformers picks for the model (sdpa where it supports it, eager e.g. for Gemma-2)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    init_seed: int = 0  # seeds random init of builtin models, so every rank builds identical weights
    # The output head and loss run only at supervised positions, this many at a time and recomputed in
    # backward, so no [tokens, vocab] logits tensor larger than one chunk ever exists. 0: one chunk.
    logits_chunk_tokens: int = 1024
    # How log-probs are computed (model/families.py): chunked = the head above, with the family's logit
    # transforms; exact = the model's own forward, at the supervised columns only; auto = chunked for the
    # families dstrain knows, exact otherwise. Checked against the model's own forward before step 1.
    head: Literal["auto", "chunked", "exact"] = "auto"
    # MoE: weight of the router's load-balancing loss in the objective; unset: the model config's value
    router_aux_loss_coef: float | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # all-linear never adapts an MoE router
    # MoE experts stored as 3-D parameters (PEFT target_parameters), e.g. ["mlp.experts.gate_up_proj"]
    target_parameters: list[str] = field(default_factory=list)
    # PEFT's adapter variants, with PEFT's names and meanings (model/variants.py):
    use_dora: bool = False  # DoRA: a trained magnitude per output feature, LoRA steers the direction
    use_rslora: bool = False  # rsLoRA: scaling alpha / sqrt(r) instead of alpha / r
    # true (A Kaiming-uniform, B zero), false, gaussian, pissa, pissa_niter_K, olora. PiSSA and OLoRA move
    # the top of each base weight into the adapter; checkpoints hold the equivalent LoRA of the original base
    init_lora_weights: bool | str = True
    # LoRA+: lora_B (and, as in PEFT, every 1-D adapter weight) at this multiple of the learning rate
    loraplus_lr_ratio: float | None = None


@dataclass
class DataConfig:
    # paths or globs (one corpus, one order), or a mixture of weighted sources (config/sources.py)
    train: list[str | DataSource] = field(default_factory=list)
    # one unnamed eval set (a list), or named sets {name: [paths]}: each logs eval_loss/<name> and the rest
    eval: list[str] | dict[str, list[str]] = field(default_factory=list)
    format: DataFormat = "sft-rag"
    max_seq_len: int = 512
    max_passage_tokens: int = 384
    packing: bool = False
    num_workers: int = 0
    # without workers: micro batches read and collated ahead by a thread while the current one trains; 0: off
    prefetch: int = 2
    on_error: Literal["fail", "skip"] = "fail"
    max_bad_fraction: float = 0.0
    seed: int = 0
    prompt_template: str = DEFAULT_TEMPLATE
    chat_template: bool = False  # wrap the RAG prompt in the tokenizer's chat template
    max_eval_samples: int = 0  # the first N of each eval set; 0: the whole set
    # Shuffle: blocks of this many consecutive records are permuted, then records are shuffled within
    # windows of `shuffle_window` blocks (block x window records). Bigger windows mix more, cost more per seek.
    shuffle_block: int = 128
    shuffle_window: int = 64
    # Sort each window of ~`length_group_window` micro batches by record size, cut it into global batches
    # and shuffle those: less padding, even ranks, the same samples per optimizer step on any world size.
    group_by_length: bool = True
    length_group_window: int = 64
    # Preference pairs: prompt, chosen and rejected in one row, the answers masked from each other, so the
    # (long, retrieved) prompt runs once per pair instead of twice, for the policy and the reference alike.
    share_prompt: bool = True
    # Every text field as it is read: Unicode NFC, control characters other than newline and tab removed,
    # trailing white space stripped (training, evaluation, generation and `dstrain convert` alike).
    clean: bool = True
    # Keep the training and eval files under the run dir at its start (data/snapshot.py): link (reflink, else
    # hard link: no space), copy (their size), off. A resume whose data changed then trains on the snapshot.
    snapshot: Literal["off", "link", "copy"] = "off"

    def eval_sets(self) -> dict[str, list[str]]:
        """The eval files by set name; a plain list is one unnamed set (""), no eval data none."""
        if isinstance(self.eval, dict):
            return dict(self.eval)
        return {"": list(self.eval)} if self.eval else {}


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = "sft"
    # dpo, ipo, kto: the KL penalty's beta; orpo: lambda, the weight of the odds-ratio term (TRL's `beta`);
    # simpo: the reward scale. 0.1 is TRL's default for dpo, orpo and kto alike (simpo's is 2.0).
    beta: float = 0.1
    label_smoothing: float = 0.0  # dpo: conservative DPO's assumed rate of flipped preference labels
    simpo_gamma: float = 0.5  # simpo: target reward margin (TRL's convention)
    nll_weight: float = 1.0  # dpo_nll: weight of the chosen answer's NLL term
    desirable_weight: float = 1.0  # kto: weight of each desirable example's loss (TRL's name and default)
    undesirable_weight: float = 1.0  # kto: weight of each undesirable example's loss
    # What a step's loss is normalised over: "global" = the whole global batch (SFT: its supervised tokens;
    # preference objectives: its real pairs; kto: its examples), whatever the split into micro batches, accumulation and ranks;
    # "micro_batch" = each micro batch's own mean, averaged (what snapshots written before the key keep).
    loss_normalization: Literal["global", "micro_batch"] = "global"
    # dpo/ipo/dpo_nll/kto: score every training pair (KTO: example) under the reference once, before step 1
    # (cached, reused by later epochs, resumes and runs on the same data); each step then runs the policy only
    precompute_reference: bool = False


@dataclass
class MlflowConfig:
    """MLflow tracking (metrics/sinks.py), on when tracking_uri or experiment is set."""

    tracking_uri: str = ""  # "": MLflow's own default (MLFLOW_TRACKING_URI, else its local store)
    experiment: str = ""  # "": MLflow's default experiment
    run_name: str = ""  # "": the run dir's name

    @property
    def enabled(self) -> bool:
        return bool(self.tracking_uri or self.experiment or self.run_name)


@dataclass
class TrainConfig:
    max_steps: int = 0  # 0: run `epochs` full epochs
    epochs: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval (eval still runs at the end when eval data is given)
    save_every: int = 0  # 0: save only at the end
    keep_last: int = 3
    seed: int = 42
    global_batch_size: int = 0  # fills "auto" train_batch_size in the ZeRO JSON; 0: micro x world
    max_nonfinite_steps: int = 5  # stop after this many optimizer steps in a row skipped for NaN/inf
    # greedy-generate answers for this many eval samples and report eval_exact_match / eval_token_f1; 0: off
    eval_generate: int = 0
    eval_max_new_tokens: int = 32  # bound on each generated answer
    # the checkpoint kept as best: one of config/metrics.py EVAL_METRICS, or a named eval set's (eval_loss/rag)
    best_metric: str = "eval_loss"
    wandb_project: str = ""  # also log to Weights & Biases (needs `pip install wandb`); "" = off
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)  # also log to MLflow (needs mlflow installed)
    # Before training, estimate memory per rank; over the device's capacity: error (stop), warn, or off.
    memory_check: Literal["error", "warn", "off"] = "error"
    # Ulysses sequence parallelism: each sequence is split along its length over groups of this many
    # consecutive ranks (distributed/sequence.py); 1 = off. Must divide the world size and the head count.
    sequence_parallel_size: int = 1
    # The LR schedule of a resumed run whose train.max_steps/epochs changed: keep = the original plan;
    # stretch = its decay continues from the current LR to its end value over the new length (no re-warm);
    # auto = keep when the length is unchanged, stretch when it changed. Said at start-up.
    resume_schedule: Literal["auto", "keep", "stretch"] = "auto"
    # Rank 0 draws loss.png at the end (about 1.5 s of matplotlib); `dstrain plot RUN_DIR` draws it any time.
    plot: bool = True


@dataclass
class DistributedConfig:
    # every rank must reach rank 0's rendezvous within this (nodes may start in any order, so not too short)
    rendezvous_timeout_s: int = 300
    # a collective waiting longer than this fails (the process group's timeout; ZeRO-3 saves gather in one)
    collective_timeout_s: int = 600
    # a rank whose heartbeat stops for this long is reported dead and the job is stopped; 0: no heartbeat
    heartbeat_timeout_s: int = 90


@dataclass
class RunConfig:
    version: int = CONFIG_VERSION  # the config schema (dstrain.config.migrate); optional in a user's YAML
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    ds_config: str = "ds_configs/zero2.json"
    output_dir: str = "runs/default"


# --------------------------------------------------------------------------------------------- parsing


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Read a YAML run config (or start from `base`), apply `a.b=c` overrides, validate strictly."""
    raw: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        raw = read_yaml(Path(path))
    apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path) if path else "run config")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last
    one silently, so a second `rag:` under data.eval would drop the first set without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges keys that the mapping's own may override: not a duplicate
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key once per mapping)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"{path}: file not found (pass an existing run YAML with --config)"])
    try:
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(raw).__name__}"])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """Apply `section.key=value` overrides in place; values are parsed as YAML scalars/lists."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
            continue
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: {part} is not a section")
                break
        else:
            try:
                node[leaf] = parse_override_value(value)
            except ValueError as exc:
                problems.append(f"--set {item!r}: {exc}")
    if problems:
        raise ConfigError(problems, source="overrides")


def parse_override_value(text: str) -> Any:
    """A YAML scalar, list or flow mapping (`100`, `true`, `[a, b]`, `{rag: [r.jsonl]}`); anything else, e.g. a
    template with ': ' that YAML would read as a mapping, stays text."""
    braced = text.lstrip()[:1] in ("[", "{")
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader) if text.strip() else ""  # a SafeLoader
    except yaml.YAMLError as exc:
        if braced:  # meant as a list or mapping: a typo, not text
            raise ValueError(f"not a valid YAML list/mapping ({getattr(exc, 'problem', exc)})") from None
        return text
    return text if isinstance(value, dict) and not braced else value


def config_from_dict(raw: dict[str, Any], source: str = "run config") -> RunConfig:
    raw = upgrade(raw, source)  # an older schema's keys renamed, each reported; a newer schema refused
    problems: list[str] = []
    cfg = build(RunConfig, raw, "", problems)
    if not problems:
        from dstrain.config.checks import check_values  # the checks import this module's dataclasses

        problems.extend(check_values(cfg))
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


# ------------------------------------------------------------------------------------------ semantics


def config_paths(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the run config as a dotted path ("data.max_seq_len", "output_dir"), read from the
    dataclasses, so lists of keys elsewhere can be checked against the fields that really exist."""
    hints = typing.get_type_hints(cls)
    paths: list[str] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths += config_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
