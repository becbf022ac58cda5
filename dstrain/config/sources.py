"""Training data sources: `data.train` as a plain list of paths, or a weighted mixture of named sources.

A plain list of paths or globs (`[a.jsonl, more/*.jsonl]`) is one corpus in one format, read in one shuffled
order: what it always meant, bit for bit. A list with at least one mapping (or a single mapping) is a
mixture: each item is a source `{path, name, weight, format, max_samples, epochs}` (a bare path among
mappings is a source with the defaults). The record formats live here, in one place (`FORMATS`), with the
objectives each one can train (`formats_for`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from dstrain.config.run import DataConfig, RunConfig

DataFormat = Literal["preference", "sft-rag", "messages", "kto"]
FORMATS: tuple[str, ...] = get_args(DataFormat)
PAIR_FORMATS = ("preference",)  # records that hold a chosen and a rejected answer
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq")
# A source name becomes a metric key (mix/<name>/samples, loss/<name>): TensorBoard tags and W&B keys.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The weights' ratio in whole numbers sets the interleave's period (data/interleave.py): keep it small.
MAX_WEIGHT_SUM = 100_000


def formats_for(objective: str) -> tuple[str, ...]:
    """The record formats `objective` trains on in a mixture: SFT any with a reference answer (a preference
    record trains its chosen answer; kto records are labelled answers, not references), the preference
    objectives pairs only. KTO trains on one source (config/checks.py)."""
    return tuple(f for f in FORMATS if f != "kto") if objective == "sft" else PAIR_FORMATS


@dataclass
class DataSource:
    """One item of a mixture, as the user writes it (defaults filled by `sources_of`)."""

    path: str = ""  # a file, a glob or a directory (its data files, recursively, in sorted order)
    name: str = ""  # the metric key; default: the file stem (a glob's or directory's name)
    weight: float = 1.0  # relative sampling rate in records
    format: DataFormat | None = None  # default: data.format
    max_samples: int = 0  # only the first N records of the source (file order); 0: all
    epochs: int = 0  # the source stops after this many passes and the others take its share; 0: no limit


@dataclass(frozen=True)
class Source:
    """A mixture source with its defaults filled in; `index` is its place in data.train."""

    index: int
    name: str
    path: str
    weight: float
    format: str
    max_samples: int
    epochs: int

    @property
    def where(self) -> str:
        return f"data.train[{self.index}]"


def is_mixture(train: list[Any]) -> bool:
    """A list with at least one mapping is a mixture; a list of paths keeps its plain meaning."""
    return any(isinstance(item, DataSource) for item in train)


def default_name(path: str) -> str:
    """The file stem (`rag.jsonl` -> rag); for a glob the name of the folder it matches in
    (`general/*.parquet` -> general); for a directory its name. "" when the path gives none."""
    parts = PurePath(path).parts
    trimmed = parts
    while trimmed and any(c in trimmed[-1] for c in "*?["):
        trimmed = trimmed[:-1]
    if not trimmed or trimmed[-1] in ("/", ".", ".."):
        return ""
    last = PurePath(trimmed[-1])
    return last.stem if trimmed == parts and last.suffix.lower() in DATA_SUFFIXES else last.name


def sources_of(data: DataConfig) -> list[Source]:
    """The sources of a mixture, defaults filled in (name: the path's stem, format: data.format)."""
    out = []
    for index, item in enumerate(data.train):
        spec = item if isinstance(item, DataSource) else DataSource(path=item)
        out.append(
            Source(
                index,
                spec.name or default_name(spec.path),
                spec.path,
                spec.weight,
                spec.format or data.format,
                spec.max_samples,
                spec.epochs,
            )
        )
    return out


def train_patterns(data: DataConfig) -> list[str]:
    """Every path or glob of data.train in order (a mixture's: each source's path)."""
    return [item.path if isinstance(item, DataSource) else item for item in data.train]


def integer_weights(weights: list[float]) -> tuple[int, ...]:
    """The weights' ratio in the smallest whole numbers, reading each as the decimal it was written as
    (0.1 is 1/10, not the binary float): 0.75 and 0.25 -> (3, 1); 1, 7, 2 -> (1, 7, 2)."""
    fractions = [Fraction(repr(float(w))) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    whole = [int(f * scale) for f in fractions]
    common = math.gcd(*whole)
    return tuple(w // common for w in whole)


def check_sources(cfg: RunConfig) -> list[str]:
    """A mixture's sources: a path, a usable and distinct name, a positive weight of a manageable ratio,
    limits >= 0, and formats the objective trains on (one message for all the sources that do not fit)."""
    if not is_mixture(cfg.data.train):
        return []
    sources = sources_of(cfg.data)
    p: list[str] = []
    for s in sources:
        p += source_problems(s)
    seen: dict[str, Source] = {}
    for s in sources:
        if s.name in seen:
            p.append(
                f"{s.where}: source name '{s.name}' is already the name of {seen[s.name].where} "
                f"({seen[s.name].path}); give each source its own name"
            )
        seen.setdefault(s.name, s)
    weights = [s.weight for s in sources]
    if all(math.isfinite(w) and w > 0 for w in weights) and sum(integer_weights(weights)) > MAX_WEIGHT_SUM:
        p.append(
            f"data.train: the weights {', '.join(repr(w) for w in weights)} are in the ratio "
            f"{':'.join(map(str, integer_weights(weights)))}, whose sum is over {MAX_WEIGHT_SUM:,} (the period of "
            "the interleave); write them as small whole numbers or short decimals (e.g. 3 and 1)"
        )
    allowed = formats_for(cfg.objective.name)
    wrong = [s for s in sources if s.format not in allowed]
    if wrong:
        named = ", ".join(f"{s.name or s.path} ({s.format})" for s in wrong)
        p.append(
            f"data.train: objective.name '{cfg.objective.name}' trains on {' or '.join(allowed)} records; "
            f"source(s) {named} hold other records: drop them from the mixture, or train them with "
            "objective.name=sft"
        )
    if cfg.data.snapshot != "off":
        # a snapshot redirects data.train as one list of paths (data/snapshot.py); a mixture's sources carry
        # names, weights and formats that redirect does not map yet
        p.append(
            f"data.snapshot={cfg.data.snapshot} takes a plain list of data.train paths, not a mixture of sources "
            "yet: set data.snapshot=off for this run (or keep a copy of its sources yourself)"
        )
    return p


def source_problems(s: Source) -> list[str]:
    p = []
    if not s.path.strip():
        p.append(f"{s.where}.path: a file, glob or directory is required")
    if not s.name:
        p.append(f"{s.where}.name: {s.path!r} gives no name for the source; set name: (e.g. name: rag)")
    elif not NAME.fullmatch(s.name):
        p.append(
            f"{s.where}.name: '{s.name}' is not usable as a metric key (mix/{s.name}/samples); use letters, "
            "digits, '_', '-' and '.', starting with a letter or digit"
        )
    if not (math.isfinite(s.weight) and s.weight > 0):
        p.append(f"{s.where}.weight: must be > 0 (a relative sampling rate in records), got {s.weight}")
    for key in ("max_samples", "epochs"):
        if getattr(s, key) < 0:
            p.append(f"{s.where}.{key}: must be >= 0 (0: no limit), got {getattr(s, key)}")
    return p
