"""`dstrain validate-data`: one file in one format, or every training file of a run config.

`validate-data PATH --format F` checks one file: a `PATH:LINE: reason` line per bad record, then a summary
(the SPEC contract). `validate-data --config RUN.yaml` checks what that run would train on, each file in
its source's format, with the same lines per file, then per source its records (good and bad, the usable
ones after max_samples) and, for the run's length and global batch, how often the run would read it (its
expected passes). Either way the result is the index that training on the unchanged files then reuses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dstrain.config.run import RunConfig, load_config
from dstrain.config.sources import is_mixture, sources_of
from dstrain.config.zero import data_parallel_world, find_ds_config, load_ds_config, plan_batch
from dstrain.data.index import FileIndex, index_file, iter_bad
from dstrain.data.mixture import MixturePlan, SourceSpan
from dstrain.data.records import expand_paths
from dstrain.data.sources import Mixture, mixture_steps_per_epoch, source_seed
from dstrain.errors import ConfigError, DataError

Echo = Callable[[str], None]


def report_file(index: FileIndex, echo: Echo) -> tuple[int, int]:
    """Each bad record of one file, then its summary line; (good, bad)."""
    for bad in iter_bad(index):
        echo(str(bad))
    good, bad = len(index), index.num_bad
    cleaned = f", {index.num_cleaned} changed by cleaning (data.clean)" if index.num_cleaned else ""
    echo(f"{index.path}: {good + bad} records, {good} ok, {bad} bad{cleaned}")
    if good + bad == 0:
        echo(f"{index.path}: the file holds no records (empty or only blank lines)")
    return good, bad


def validate_file(path: Path, fmt: str, echo: Echo) -> int:
    """The exit status of `validate-data PATH --format F`: 1 on any bad record or none at all."""
    good, bad = report_file(index_file(path, fmt), echo)
    return 1 if bad or good == 0 else 0


def global_batch(cfg: RunConfig, world: int) -> int:
    """The run's global batch on `world` ranks, from train.global_batch_size or its ZeRO JSON."""
    problems: list[str] = []
    plan = plan_batch(
        load_ds_config(find_ds_config(cfg.ds_config)), cfg, data_parallel_world(cfg, world), problems
    )
    if problems:
        raise ConfigError(problems, source=str(cfg.ds_config))
    return plan.global_batch


def validate_config(path: Path, overrides: list[str], world: int, echo: Echo) -> int:
    """The exit status of `validate-data --config RUN.yaml`: every training file of the run, per source."""
    cfg = load_config(path, overrides)
    if not is_mixture(cfg.data.train):
        files = [index_file(p, cfg.data.format, clean=cfg.data.clean) for p in expand_paths(cfg.data.train)]
        counts = [report_file(index, echo) for index in files]
        good, bad = sum(c[0] for c in counts), sum(c[1] for c in counts)
        echo(
            f"data.train ({cfg.data.format}): {len(files)} file(s), {good + bad} records, {good} ok, {bad} bad"
        )
        return 1 if bad or good == 0 else 0
    spans, status = [], 0
    for source in sources_of(cfg.data):
        what = f"{source.where} ({source.name})"
        files = [
            index_file(p, source.format, clean=cfg.data.clean) for p in expand_paths([source.path], what)
        ]
        counts = [report_file(index, echo) for index in files]
        good, bad = sum(c[0] for c in counts), sum(c[1] for c in counts)
        usable = min(good, source.max_samples) if source.max_samples else good
        cut = f", the first {usable} used (max_samples)" if usable < good else ""
        echo(
            f"{what}: {source.format}, weight {source.weight:g}: {good + bad} records, {good} ok, {bad} bad{cut}"
        )
        status |= 1 if bad or good == 0 else 0
        start = sum(span.records for span in spans)
        spans.append(
            SourceSpan(source.name, start, usable, source.weight, source.epochs, source_seed(0, source.name))
        )
    if all(span.records for span in spans):
        echo(passes_line(cfg, spans, world))
    return status


def passes_line(cfg: RunConfig, spans: list[SourceSpan], world: int) -> str:
    batch = global_batch(cfg, world)
    try:
        steps = cfg.train.max_steps or cfg.train.epochs * mixture_steps_per_epoch(spans, batch)
    except DataError as exc:
        return f"no expected passes: {exc}"
    plan = MixturePlan(spans, batch)
    if plan.end is not None and plan.end < steps:
        return f"the sources' epochs limits end the data at step {plan.end}, before the run's {steps} steps"
    mixture = Mixture(sources_of(cfg.data), spans, plan, [[] for _ in spans])
    ranks = "" if cfg.train.global_batch_size else f" on {world} rank(s) (--world-size N for another)"
    return f"{mixture.line(steps)}; global batch {batch}{ranks}"
