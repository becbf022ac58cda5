"""A mixture's sources as one corpus: each source's files indexed in its own format, one after another.

Source s owns corpus indices start_s .. start_s + n_s - 1 (n_s: its valid records, cut to `max_samples`,
the first ones in file order: a fixed subset, reshuffled each epoch, whose memory does not grow with it).
Its records are drawn in its own shuffled order, seeded from data.seed and its name, so adding a source
leaves the others' orders as they were. The plan (data/mixture.py) says how many each global batch takes.

For a mixture, `train.epochs` counts passes over the source with the largest weight (the first of them on a
tie): an epoch is the steps in which, at the starting weights, that source gives its n records once; the
others give theirs as often as their weights say (the start-up line and `validate-data --config` say how
often: their expected passes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dstrain.config.run import RunConfig
from dstrain.config.sources import Source, integer_weights, sources_of
from dstrain.data.index import FileIndex, index_file
from dstrain.data.mixture import MixturePlan, Origin, SourceSpan
from dstrain.data.records import check_bad, expand_paths
from dstrain.data.stream import Corpus
from dstrain.errors import DataError


@dataclass
class Mixture:
    """A run's sources: the config's facts, where each one's records are, and the plan of its batches."""

    sources: list[Source]
    spans: list[SourceSpan]
    plan: MixturePlan
    files: list[list[str]]  # each source's files, in corpus order

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def starts(self) -> np.ndarray:
        return np.array([span.start for span in self.spans], dtype=np.int64)

    def describe_files(self) -> list[list[dict]]:
        """Each source's files with their fingerprints (data/provenance.py)."""
        from dstrain.data.provenance import describe_file

        return [[describe_file(Path(p)) for p in paths] for paths in self.files]

    def passes(self, step: int) -> list[float]:
        """Passes over each source's records by global batch `step`."""
        drawn = self.plan.counts(step)
        return [int(d) / span.records for d, span in zip(drawn, self.spans, strict=True)]

    def line(self, total_steps: int) -> str:
        """The start-up line: each source's weight, share, records and expected passes over the run."""
        weights = integer_weights([span.weight for span in self.spans])
        passes = self.passes(total_steps)
        parts = []
        for span, w, done in zip(self.spans, weights, passes, strict=True):
            limit = f", stops after {span.epochs}" if span.epochs else ""
            parts.append(
                f"{span.name} {w / sum(weights):.0%} of {span.records:,} records ({done:.2f} passes{limit})"
            )
        lead = self.spans[int(np.argmax(weights))].name
        window = (
            "each source's count in every window of global batches is within 1 of its share"
            if self.plan.balanced
            else "each source's running count is within 1 of its share (a window's within 2)"
        )
        return (
            f"mixture over {total_steps} steps: {'; '.join(parts)}; an epoch is a pass over {lead}; {window}"
        )


def source_seed(seed: int, name: str) -> int:
    """A source's own shuffle seed: from data.seed and its name, not its place in the list."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def index_sources(cfg: RunConfig) -> tuple[Corpus, list[Source], list[SourceSpan], list[list[str]]]:
    """Index every source's files in its format, apply data.on_error to each source's bad records, and lay
    the sources out in one corpus."""
    files: list[FileIndex] = []
    sources, spans, paths = sources_of(cfg.data), [], []
    for source in sources:
        what = f"{source.where} ({source.name})"
        found = [
            index_file(p, source.format, clean=cfg.data.clean) for p in expand_paths([source.path], what)
        ]
        valid, num_bad = sum(len(f) for f in found), sum(f.num_bad for f in found)
        bad = [record for f in found for record in f.bad]
        check_bad(valid, bad, num_bad, cfg.data.on_error, cfg.data.max_bad_fraction, what)
        start = sum(len(f) for f in files)
        records = min(valid, source.max_samples) if source.max_samples else valid
        seed = source_seed(cfg.data.seed, source.name)
        spans.append(SourceSpan(source.name, start, records, source.weight, source.epochs, seed))
        files += found
        paths.append([f.path for f in found])
    return Corpus(files), sources, spans, paths


def mixture_steps_per_epoch(spans: list[SourceSpan], global_batch: int) -> int:
    """Steps in which the source with the largest weight gives its records once, at the starting weights."""
    weights = integer_weights([span.weight for span in spans])
    lead = int(np.argmax(weights))
    steps = spans[lead].records * sum(weights) // (weights[lead] * global_batch)
    if steps == 0:
        raise DataError(
            f"data.train: source {spans[lead].name} (the largest weight) has {spans[lead].records} records, "
            f"fewer than its share of one global batch of {global_batch}: add data, or set train.max_steps "
            "instead of train.epochs"
        )
    return steps


def build_mixture(
    spans: list[SourceSpan],
    sources: list[Source],
    paths: list[list[str]],
    global_batch: int,
    total_steps: int,
    origin: Origin | None = None,
) -> Mixture:
    """The plan of the run's batches; the data must last `total_steps` (sources with `epochs` limits end it)."""
    plan = MixturePlan(spans, global_batch, origin or Origin())
    if plan.end is not None and plan.end < total_steps:
        limits = ", ".join(f"{s.name} after {s.epochs}" for s in spans if s.epochs)
        raise DataError(
            f"data.train: every source stops at its epochs limit ({limits} epoch(s)), so the data ends at "
            f"step {plan.end}, before the run's {total_steps} steps: set train.max_steps={plan.end} or less, "
            "or raise (or drop) a source's epochs"
        )
    return Mixture(sources, spans, plan, paths)
