"""Everything checked and loaded before a process group exists: config, ZeRO JSON, model path, data.

Nothing here touches torch.distributed, so a bad config or bad data fails on every rank the same way,
at once, with one message, instead of leaving peers waiting in a collective.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from dstrain.config.checks import PAIR_ROW_FORMATS
from dstrain.config.run import RunConfig, dump_yaml
from dstrain.config.sources import Source, is_mixture, sources_of
from dstrain.config.zero import (
    BatchPlan,
    data_parallel_world,
    find_ds_config,
    load_ds_config,
    plan_batch,
    resolve_ds_config,
)
from dstrain.data.batches import Example
from dstrain.data.index import index_file
from dstrain.data.kto import MIN_RECORDS, KtoExample, examples_per_record
from dstrain.data.loader import TokenizedCorpus, steps_per_epoch
from dstrain.data.mixture import Origin, SourceSpan
from dstrain.data.pairs import PairExample
from dstrain.data.records import BadRecord, check_bad, expand_paths
from dstrain.data.sources import Mixture, build_mixture, index_sources, mixture_steps_per_epoch
from dstrain.data.stream import Corpus
from dstrain.errors import ConfigError, DataError, DstrainError
from dstrain.eval.sets import EvalSet
from dstrain.model.build import check_model_path, hidden_size, load_tokenizer
from dstrain.training.phases import StartupClock


@dataclass
class Prepared:
    cfg: RunConfig
    ds: dict[str, Any]
    ds_source: dict[str, Any]  # the ZeRO JSON as given, "auto" entries included
    plan: BatchPlan
    tokenizer: PreTrainedTokenizerBase
    train: TokenizedCorpus  # read and tokenised on demand
    eval: list[EvalSet]  # the unnamed set of a plain data.eval list, or the named sets; [] without eval data
    skipped: int  # bad training records found by the index (more may surface at tokenisation)
    steps_per_epoch: int
    total_steps: int
    config_yaml: str
    config_digest: str
    mixture: Mixture | None = None  # data.train as weighted sources (data/sources.py)


def _collect(problems: list[str], fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ConfigError as exc:
        problems.extend(exc.problems)
    except DstrainError as exc:
        problems.append(str(exc))
    return None


def preflight(
    cfg: RunConfig, world: int, ds_source: dict[str, Any] | None = None, planning: bool = False
) -> dict[str, Any]:
    """Check every file the run needs and the batch arithmetic; raise one ConfigError listing all problems.

    `ds_source` replaces the ZeRO JSON file named by the config (a resumed run uses its checkpoint's copy).
    `planning` (`dstrain train --dry-run`): output_dir is checked but not created, and the precision is not
    checked against this machine's accelerator (the job may run on another kind of machine).
    """
    problems = check_model_path(cfg.model)
    if not problems:
        problems += check_attention(cfg)
    raw = ds_source
    if raw is None:
        path = _collect(problems, find_ds_config, cfg.ds_config)
        if path is not None:
            raw = _collect(problems, load_ds_config, path)
    if is_mixture(cfg.data.train):
        for source in sources_of(cfg.data):
            _collect(problems, expand_paths, [source.path], f"{source.where} ({source.name})")
    else:
        _collect(problems, expand_paths, cfg.data.train, "data.train")
    for name, patterns in cfg.data.eval_sets().items():
        _collect(problems, expand_paths, patterns, eval_key(name))
    if raw is not None:
        # A dry run of the resolution with a placeholder schedule: batch and precision problems surface now.
        precision = (True, True) if planning else device_precision()
        _collect(problems, lambda: resolve_ds_config(raw, cfg, world, 1, None, *precision))
    problems += check_output_dir(Path(cfg.output_dir), create=not planning)
    if cfg.train.wandb_project and importlib.util.find_spec("wandb") is None:
        problems.append(
            "train.wandb_project is set but wandb is not installed: `pip install wandb`, or set "
            "train.wandb_project='' (TensorBoard and metrics.jsonl are always written)"
        )
    if cfg.train.mlflow.enabled and importlib.util.find_spec("mlflow") is None:
        problems.append(
            "train.mlflow is set but mlflow is not installed: `pip install mlflow-skinny` (or mlflow), or "
            "remove train.mlflow (TensorBoard and metrics.jsonl are always written)"
        )
    if problems:
        raise ConfigError(problems, source="run")
    return raw


def check_attention(cfg: RunConfig) -> list[str]:
    """The model's attention (read from its config.json) against what the run hands it: sequence-parallel
    heads, and the 4-D record masks of packed rows and shared-prompt pairs (model/windows.py)."""
    from transformers import AutoConfig

    from dstrain.model.build import model_dir
    from dstrain.model.windows import mask_problems

    sequence = cfg.train.sequence_parallel_size > 1
    if not (sequence or cfg.data.packing or (cfg.data.share_prompt and cfg.data.format in PAIR_ROW_FORMATS)):
        return []
    try:
        config = AutoConfig.from_pretrained(
            str(model_dir(cfg.model)), trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        return [f"model.path: unreadable model config in {model_dir(cfg.model)} ({exc})"]
    problems = check_sequence_heads(cfg, config) if sequence else []
    return problems + mask_problems(cfg, config)


def check_sequence_heads(cfg: RunConfig, config: Any) -> list[str]:
    """train.sequence_parallel_size against the model's attention: heads that split evenly, and no
    soft-capping or sliding window the Ulysses attention would leave out."""
    from dstrain.distributed.sequence import check_heads
    from dstrain.model.ulysses import unsupported

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    problems = check_heads(heads, kv_heads, cfg.train.sequence_parallel_size)
    if (why := unsupported(config)) is not None:
        problems.append(
            f"train.sequence_parallel_size: {cfg.model.path} uses {why}, which the sequence-parallel attention "
            "(plain causal SDPA) does not compute; train it with sequence_parallel_size 1"
        )
    return problems


def check_output_dir(path: Path, create: bool = True) -> list[str]:
    """output_dir must be creatable and writable now, not discovered unwritable at the first save.

    Without `create`, the nearest directory that exists must let this user create the rest."""
    if not create:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return []
        return [f"output_dir: cannot create {path} ({existing} is not a writable directory)"]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [f"output_dir: cannot create {path} ({exc.strerror or exc}); choose a writable location"]
    if not os.access(path, os.W_OK | os.X_OK):
        return [f"output_dir: {path} is not writable by this user; choose a writable location"]
    return []


def device_precision() -> tuple[bool, bool]:
    """(bf16 supported, fp16 supported) on this rank's accelerator."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return bool(acc.is_bf16_supported()), bool(acc.is_fp16_supported())


def index_split(patterns: list[str], what: str, cfg: RunConfig) -> Corpus:
    """Index (or find in the cache) every file of a split, and apply data.on_error to its bad records."""
    corpus = Corpus(
        [index_file(path, cfg.data.format, clean=cfg.data.clean) for path in expand_paths(patterns, what)]
    )
    bad = [record for index in corpus.files for record in index.bad]
    check_bad(len(corpus), bad, corpus.num_bad, cfg.data.on_error, cfg.data.max_bad_fraction, what)
    return corpus


def eval_key(name: str) -> str:
    """Where an eval set's files are configured, for messages: data.eval, or data.eval.<name>."""
    return f"data.eval.{name}" if name else "data.eval"


def load_eval(tokenizer: PreTrainedTokenizerBase, cfg: RunConfig) -> list[EvalSet]:
    """Every eval set (the unnamed one of a plain list, or each named set), tokenised up front."""
    return [
        EvalSet(name, load_eval_set(tokenizer, cfg, patterns, eval_key(name)))
        for name, patterns in cfg.data.eval_sets().items()
    ]


def load_eval_set(
    tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, patterns: list[str], what: str
) -> list[Example] | list[PairExample] | list[KtoExample]:
    """One eval set, tokenised up front (it is read at every eval), its first data.max_eval_samples records;
    over-long records are bad records too."""
    # Preference data is always evaluated as pairs: preference accuracy is reported whatever the objective.
    # KTO scores each answer as an example of its own.
    pairs = cfg.data.format == "preference"
    corpus = index_split(patterns, what, cfg)
    dataset = TokenizedCorpus(corpus, tokenizer, cfg.data, pairs, kto=kto_examples(cfg, corpus, what))
    limit = min(len(dataset), cfg.data.max_eval_samples or len(dataset))
    items = [dataset[i] for i in range(limit)]
    examples = [item for item in items if not isinstance(item, BadRecord)]
    bad = [item for item in items if isinstance(item, BadRecord)]
    check_bad(len(examples), bad, len(bad), cfg.data.on_error, cfg.data.max_bad_fraction, what)
    if not examples:
        raise DataError(
            f"{what}: every record was skipped as bad; fix the eval file or drop it from data.eval"
        )
    return examples


def kto_examples(cfg: RunConfig, corpus: Corpus, what: str) -> int:
    """KTO examples per record of `corpus` (data/kto.py), 0 for other objectives; KTO's mismatched answers
    come from other records, so a KTO split needs at least two."""
    if cfg.objective.name != "kto":
        return 0
    if len(corpus) < MIN_RECORDS:
        raise DataError(
            f"{what}: {len(corpus)} usable record(s); KTO needs at least {MIN_RECORDS}, as its reference "
            "point pairs each prompt with another record's answer"
        )
    return examples_per_record(cfg.data.format)


def digest(cfg_yaml: str, ds: dict[str, Any]) -> str:
    payload = cfg_yaml + json.dumps(ds, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_chat_template(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """messages records (data.format, or a mixture source's format) and data.chat_template need one."""
    messages = (
        [s.name for s in sources_of(cfg.data) if s.format == "messages"] if is_mixture(cfg.data.train) else []
    )
    why = "data.chat_template=true" if cfg.data.chat_template else ""
    if cfg.data.format == "messages" and not is_mixture(cfg.data.train):
        why = "data.format=messages"
    elif messages:
        why = f"the messages source(s) {', '.join(messages)}"
    if why and not getattr(tokenizer, "chat_template", None):
        raise ConfigError([f"{why} need(s) a chat template, and the tokenizer of {cfg.model.path} has none"])


Sources = tuple[list[Source], list[SourceSpan], list[list[str]]]


def load_train(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[TokenizedCorpus, Sources | None]:
    """The training corpus, read and tokenised on demand; a mixture's sources laid out in one corpus."""
    pairs = cfg.objective.name != "sft"
    if not is_mixture(cfg.data.train):
        corpus = index_split(cfg.data.train, "data.train", cfg)
        kto = kto_examples(cfg, corpus, "data.train")
        return TokenizedCorpus(corpus, tokenizer, cfg.data, pairs=pairs, kto=kto), None
    corpus, sources, spans, paths = index_sources(cfg)
    starts = np.array([span.start for span in spans], dtype=np.int64)
    train = TokenizedCorpus(corpus, tokenizer, cfg.data, pairs=pairs, source_starts=starts)
    return train, (sources, spans, paths)


def plan_steps(
    cfg: RunConfig, samples: int, mixed: Sources | None, batch: BatchPlan, origin: Origin | None
) -> tuple[int, int, Mixture | None]:
    """(steps per epoch, the run's steps, a mixture's plan): for a mixture, an epoch is one pass over its
    source with the largest weight (data/sources.py)."""
    if mixed is None:
        per_epoch = steps_per_epoch(samples, batch)
        return per_epoch, cfg.train.max_steps or cfg.train.epochs * per_epoch, None
    sources, spans, paths = mixed
    per_epoch = mixture_steps_per_epoch(spans, batch.global_batch)
    total = cfg.train.max_steps or cfg.train.epochs * per_epoch
    return per_epoch, total, build_mixture(spans, sources, paths, batch.global_batch, total, origin)


def prepare(
    cfg: RunConfig,
    world: int,
    ds_source: dict[str, Any] | None = None,
    clock: StartupClock | None = None,
    planning: bool = False,
    origin: Origin | None = None,
) -> Prepared:
    """Check everything (one ConfigError), load the tokenizer, index the data, resolve the ZeRO JSON.

    `clock` books the checks and tokenizer as "config", the data index and eval set as "data index".
    `planning`: for `dstrain train --dry-run`, which creates nothing (see preflight).
    `origin`: where a resumed mixture's plan starts (data/mixture.py)."""
    clock = clock or StartupClock()
    raw = preflight(cfg, world, ds_source, planning)
    tokenizer = load_tokenizer(cfg.model)
    clock.lap("config")
    check_chat_template(cfg, tokenizer)
    train, mixed = load_train(cfg, tokenizer)
    eval_sets = load_eval(tokenizer, cfg)
    # preflight validated the JSON: the batch plan alone gives the schedule length, then resolve once.
    batch = plan_batch(raw, cfg, data_parallel_world(cfg, world), problems=[])
    per_epoch, total, mixture = plan_steps(cfg, len(train), mixed, batch, origin)
    precision = (True, True) if planning else device_precision()
    # a resume keeps its checkpoint's schedule numbers by choice (train.resume_schedule): not compared here
    ds, plan = resolve_ds_config(
        raw, cfg, world, total, hidden_size(cfg.model), *precision, check_length=ds_source is None
    )
    config_yaml = dump_yaml(cfg)
    clock.lap("data index")
    return Prepared(
        cfg,
        ds,
        raw,
        plan,
        tokenizer,
        train,
        eval_sets,
        train.corpus.num_bad,
        per_epoch,
        total,
        config_yaml,
        digest(config_yaml, ds),
        mixture,
    )
