"""Semantic checks of a parsed run config: ranges and cross-field rules that types alone cannot express.

Each check returns its problems as strings; `config.run.config_from_dict` collects them all and raises one
ConfigError, so a user sees every problem of a config at once.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

from dstrain.config.metrics import EVAL_METRICS, EVAL_SET_NAME, set_metric
from dstrain.config.sources import check_sources, is_mixture

if TYPE_CHECKING:
    from dstrain.config.run import RunConfig

MIN_HEARTBEAT_TIMEOUT_S = 10

# Formats laid out as (prompt, answer, answer) rows: preference pairs, and KTO examples (each answer beside
# the mismatched answer that estimates KTO's reference point); data.share_prompt lays them out in one row.
PAIR_ROW_FORMATS = ("preference", "kto")
# Objectives that compare the policy with the adapter-disabled reference (the rest are reference-free).
REFERENCE_OBJECTIVES = ("dpo", "ipo", "dpo_nll", "kto")

# Keys whose value must be >= 1, and >= 0 (check_values; tests check every one names a config key).
AT_LEAST_ONE = (
    "train.sequence_parallel_size",
    "lora.r",
    "data.shuffle_block",
    "data.shuffle_window",
    "data.length_group_window",
    "lora.alpha",
    "data.max_seq_len",
    "train.log_every",
    "train.keep_last",
    "train.eval_max_new_tokens",
    "distributed.rendezvous_timeout_s",
    "distributed.collective_timeout_s",
)
AT_LEAST_ZERO = (
    "data.max_passage_tokens",
    "data.num_workers",
    "data.prefetch",
    "model.logits_chunk_tokens",
    "data.max_eval_samples",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.save_every",
    "train.global_batch_size",
    "train.max_nonfinite_steps",
    "train.eval_generate",
    "distributed.heartbeat_timeout_s",
)


def value_at(cfg: RunConfig, path: str) -> Any:
    """The value of a dotted key ("data.max_seq_len") in `cfg`."""
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def check_values(cfg: RunConfig) -> list[str]:
    """Range and cross-field checks that types alone cannot express."""
    p: list[str] = []
    for bound, paths in ((1, AT_LEAST_ONE), (0, AT_LEAST_ZERO)):
        p += [f"{k}: must be >= {bound}, got {value_at(cfg, k)}" for k in paths if value_at(cfg, k) < bound]
    if 0 < cfg.distributed.heartbeat_timeout_s < MIN_HEARTBEAT_TIMEOUT_S:
        p.append(
            f"distributed.heartbeat_timeout_s: must be 0 (off) or >= {MIN_HEARTBEAT_TIMEOUT_S}, got "
            f"{cfg.distributed.heartbeat_timeout_s} (shorter would call a rank busy in a long step dead)"
        )
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        p.append("train: set max_steps or epochs (both are 0, nothing would be trained)")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        p.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        p.append(f"data.max_bad_fraction: must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if cfg.data.max_passage_tokens >= cfg.data.max_seq_len:
        p.append(
            f"data.max_passage_tokens ({cfg.data.max_passage_tokens}) must be below data.max_seq_len "
            f"({cfg.data.max_seq_len}) to leave room for the query and the answer"
        )
    for name in ("{passages}", "{query}"):
        if name not in cfg.data.prompt_template:
            p.append(f"data.prompt_template: must contain {name}")
    if not cfg.data.train:
        p.append("data.train: no training files given (a list of JSONL/Parquet paths or globs)")
    p += check_sources(cfg)
    if isinstance(cfg.lora.target_modules, str) and cfg.lora.target_modules != "all-linear":
        p.append(
            f"lora.target_modules: a list of module names or 'all-linear', got {cfg.lora.target_modules!r}"
        )
    p += check_moe_keys(cfg)
    p += check_adapter_variants(cfg)
    p += check_objective_data(cfg)
    p += check_eval_metrics(cfg)
    if cfg.objective.name != "sft" and cfg.data.packing:
        p.append("data.packing: packs SFT rows only; set data.packing=false for preference objectives")
    p += check_objective_values(cfg)
    flash = cfg.model.attn_implementation == "flash_attention_2"
    if cfg.data.share_prompt and cfg.data.format in PAIR_ROW_FORMATS and flash:
        p.append(
            "data.share_prompt: keeps the two answers apart with a 4D attention mask, which flash_attention_2 "
            "does not take; use model.attn_implementation=sdpa (or eager), or set data.share_prompt=false"
        )
    if not cfg.output_dir.strip():
        p.append("output_dir: must not be empty")
    return p


def check_objective_data(cfg: RunConfig) -> list[str]:
    """Each objective against the data it trains on: pairs for the preference objectives, KTO's own
    unpaired format (or pairs, each giving one desirable and one undesirable example) for kto."""
    name, fmt = cfg.objective.name, cfg.data.format
    if name == "kto" and (is_mixture(cfg.data.train) or isinstance(cfg.data.eval, dict)):
        # KTO's examples and reference point are laid out per record of one corpus (data/kto.py)
        return [
            "objective.name: 'kto' trains on one data source and evaluates one eval set: give data.train as "
            "a list of paths and data.eval as a list (mixtures and named eval sets take the other objectives)"
        ]
    if name == "kto" and fmt not in PAIR_ROW_FORMATS:
        return [
            f"objective.name: 'kto' needs labelled answers: data.format=kto (an answer and label: true|false "
            f"per record) or data.format=preference (each pair gives one of each); data.format is '{fmt}'"
        ]
    if name not in ("sft", "kto") and fmt != "preference":
        return [
            f"objective.name: '{name}' needs preference data (chosen and rejected answers); "
            f"data.format is '{fmt}': use objective.name=sft, or data.format=preference"
        ]
    if fmt == "kto" and name != "kto":
        return [
            f"data.format: kto records (one answer, labelled desirable or not) train objective.name=kto; "
            f"objective.name is '{name}'"
        ]
    return []


def check_objective_values(cfg: RunConfig) -> list[str]:
    """The objective's numbers, and the options that apply to some objectives only."""
    p: list[str] = []
    obj = cfg.objective
    if not 0.0 <= obj.label_smoothing < 0.5:
        p.append(f"objective.label_smoothing: must be in [0, 0.5), got {obj.label_smoothing}")
    if obj.name == "ipo" and obj.label_smoothing:
        p.append("objective.label_smoothing: IPO has no smoothed form; set it to 0 (conservative DPO is dpo)")
    if obj.name in ("orpo", "kto") and obj.label_smoothing:
        p.append(f"objective.label_smoothing: applies to dpo and simpo, not to '{obj.name}'; set it to 0")
    if obj.precompute_reference and obj.name not in REFERENCE_OBJECTIVES:
        p.append(
            f"objective.precompute_reference: '{obj.name}' uses no reference model; "
            f"it applies to {', '.join(REFERENCE_OBJECTIVES)}"
        )
    if obj.beta <= 0:
        p.append(f"objective.beta: must be > 0, got {obj.beta}")
    weights = (obj.desirable_weight, obj.undesirable_weight)
    for key, value in zip(("desirable_weight", "undesirable_weight"), weights, strict=True):
        if not value >= 0:  # `not >=` also catches NaN
            p.append(f"objective.{key}: must be >= 0, got {value}")
    if weights == (0.0, 0.0):
        p.append("objective.desirable_weight, undesirable_weight: both 0, KTO would train on nothing")
    return p


def check_moe_keys(cfg: RunConfig) -> list[str]:
    """The MoE keys: an auxiliary-loss weight and the expert parameters LoRA adapts."""
    p: list[str] = []
    coef = cfg.model.router_aux_loss_coef
    if coef is not None and not coef >= 0:  # `not >=` also catches NaN
        p.append(
            f"model.router_aux_loss_coef: must be >= 0, or unset for the model config's value; got {coef}"
        )
    blank = [name for name in cfg.lora.target_parameters if not name.strip()]
    if blank:
        p.append(
            "lora.target_parameters: names of 3-D expert parameters (e.g. mlp.experts.gate_up_proj); "
            f"got an empty name in {cfg.lora.target_parameters!r}"
        )
    if cfg.lora.target_parameters and cfg.lora.dropout:
        p.append(
            "lora.target_parameters: PEFT adapts 3-D expert weights without dropout; set lora.dropout=0 "
            f"(got {cfg.lora.dropout})"
        )
    return p


def check_eval_sets(cfg: RunConfig) -> list[str]:
    """Named eval sets: names usable as metric keys, each set with files."""
    if not isinstance(cfg.data.eval, dict):
        return []
    p: list[str] = []
    for name, paths in cfg.data.eval.items():
        if not EVAL_SET_NAME.fullmatch(name):
            p.append(
                f"data.eval: eval set name {name!r} becomes a metric key (eval_loss/<name>): use letters, "
                "digits, '_', '-' and '.', starting with a letter or digit (e.g. rag, general)"
            )
        elif not paths:
            p.append(f"data.eval.{name}: no files given (a list of JSONL/Parquet paths or globs)")
    if cfg.data.snapshot != "off":
        # data/snapshot.py redirects data.eval as one list of paths; named sets are not mapped back yet
        p.append(
            f"data.snapshot={cfg.data.snapshot} takes data.eval as a plain list of paths, not named eval sets "
            "yet: set data.snapshot=off for this run (or keep a copy of its eval files yourself)"
        )
    return p


def check_best_metric(cfg: RunConfig) -> list[str]:
    """train.best_metric: one of EVAL_METRICS, or one of them for a configured named set (eval_loss/rag)."""
    best = cfg.train.best_metric
    metric, named, set_name = best.partition("/")
    if metric not in EVAL_METRICS:
        close = difflib.get_close_matches(metric, EVAL_METRICS, n=1)
        hint = f" (did you mean {close[0]}{named}{set_name}?)" if close else ""
        return [
            f"train.best_metric: {best!r} is not an eval metric{hint}; use one of {', '.join(EVAL_METRICS)}, "
            "or one of them for a named eval set (e.g. eval_loss/rag)"
        ]
    sets = cfg.data.eval_sets()
    if named and set_name not in sets:
        if not isinstance(cfg.data.eval, dict):
            return [
                f"train.best_metric: {best} names the eval set '{set_name}', but data.eval holds no named sets; "
                f"name them (data.eval: {{{set_name}: [FILE, ...]}}) or use {metric}"
            ]
        close = difflib.get_close_matches(set_name, list(sets), n=1)
        hint = f"; did you mean {metric}/{close[0]}?" if close else ""
        return [
            f"train.best_metric: {best}: data.eval has no set '{set_name}' (sets: {', '.join(sets)}){hint}"
        ]
    return []


def check_eval_metrics(cfg: RunConfig) -> list[str]:
    """Eval set names, and a best metric that the eval settings produce."""
    p = check_eval_sets(cfg)
    generate = cfg.train.eval_generate
    if generate and not cfg.data.eval:
        p.append("train.eval_generate: generates answers for eval samples; give data.eval files")
    if generate and cfg.data.format == "messages":
        p.append(
            "train.eval_generate: scores answers of sft-rag or preference eval data; messages data has no "
            "single reference answer (set train.eval_generate=0)"
        )
    unknown = check_best_metric(cfg)
    if unknown:
        return p + unknown
    best = cfg.train.best_metric
    metric, _, set_name = best.partition("/")
    instead = set_metric("eval_loss", set_name)
    if metric == "eval_pref_acc" and cfg.data.format != "preference":
        p.append(f"train.best_metric: {best} needs preference eval data; use {instead}")
    if metric == "eval_reward_margin" and cfg.data.format not in PAIR_ROW_FORMATS:
        p.append(f"train.best_metric: {best} needs preference or kto eval data; use {instead}")
    if metric in ("eval_exact_match", "eval_token_f1") and not generate:
        p.append(f"train.best_metric: {best} needs generated answers; set train.eval_generate (e.g. 64)")
    return p


INITS = "true, false, gaussian, pissa, pissa_niter_K (K >= 1 subspace iterations), olora"


def init_problem(init: bool | str) -> str | None:
    """What is wrong with a lora.init_lora_weights value (PEFT's names), None when dstrain runs it."""
    if isinstance(init, bool) or init in ("gaussian", "pissa", "olora"):
        return None
    if re.fullmatch(r"pissa_niter_[1-9][0-9]*", init):
        return None
    if init == "loftq":
        return (
            "lora.init_lora_weights: loftq is not supported (it needs a LoftQ-quantised copy of the base and "
            "PEFT's loftq_config); with model.load_in_4bit use olora (or true), or pissa on an unquantised base"
        )
    return f"lora.init_lora_weights: {init!r} is not one of {INITS}"


def check_adapter_variants(cfg: RunConfig) -> list[str]:
    """DoRA, rsLoRA, PiSSA/OLoRA and LoRA+ (model/variants.py) where PEFT and dstrain run them."""
    init, ratio = cfg.lora.init_lora_weights, cfg.lora.loraplus_lr_ratio
    problem = init_problem(init)
    p = [problem] if problem else []
    pissa = isinstance(init, str) and init.startswith("pissa")
    mutating = pissa or init == "olora"  # these subtract the initial adapter from the base weights
    if ratio is not None and not ratio > 0:
        p.append(f"lora.loraplus_lr_ratio: must be > 0 (lora_B's LR over lora_A's, e.g. 16), got {ratio}")
    if pissa and cfg.model.load_in_4bit:
        p.append(
            f"lora.init_lora_weights: {init} takes the SVD of each full-precision weight and PEFT refuses it "
            "on 4-bit weights; with model.load_in_4bit use olora (PEFT re-quantises its residual), or train "
            "PiSSA on the unquantised base"
        )
    if cfg.lora.target_parameters and (cfg.lora.use_dora or mutating):
        what = "lora.use_dora" if cfg.lora.use_dora else f"lora.init_lora_weights: {init}"
        p.append(
            f"{what}: PEFT adapts the 3-D expert weights of lora.target_parameters with plain LoRA only; "
            "drop lora.target_parameters or the variant"
        )
    if mutating and cfg.data.format == "preference":
        p.append(
            f"lora.init_lora_weights: {init} moves the top of each base weight into the adapter, so the "
            "adapter-disabled model that preference training and eval score against (rewards, margins, "
            "eval_pref_acc) is no longer the original model; use true or gaussian on preference data"
        )
    return p
