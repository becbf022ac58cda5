"""A mixture's sources in the trainer state and in each logged row.

The checkpoint keeps, per source, its config facts, where it is (records given, the epoch and cursor of its
next record: the plan's counts at the step, data/mixture.py), the tokens trained on, and its files
(provenance). A logged row carries, per source `<name>`: `mix/<name>/samples` (records given, cumulative,
bad ones included like `samples`), `mix/<name>/tokens` (non-padding tokens trained on, cumulative, all
ranks), `mix/<name>/epoch` (the epoch, from 0, of its last record given) and `loss/<name>`: the source's
train loss over the logged window, token-weighted for SFT (its NLL over its supervised tokens), per pair for
preference objectives (the mean of its pairs' losses), over the steps whose loss was finite; null when the
window drew nothing from it.
"""

from __future__ import annotations

from typing import Any

import torch

from dstrain.checkpoint.state import TrainerState
from dstrain.config.run import ObjectiveConfig
from dstrain.data.batches import SourceBatch
from dstrain.data.mixture import Origin
from dstrain.data.sources import Mixture
from dstrain.objectives.preference import PairScores, nll_weight


def initial_sources(mixture: Mixture, files: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The state's per-source records at the plan's start, no tokens trained yet."""
    entries = []
    for source, span, described in zip(mixture.sources, mixture.spans, files, strict=True):
        entries.append(
            {
                "name": source.name,
                "weight": source.weight,
                "format": source.format,
                "records": span.records,
                "max_samples": source.max_samples,
                "epochs": source.epochs,
                "samples": 0,
                "epoch": 0,
                "cursor": 0,
                "tokens": 0,
                "files": described,
            }
        )
    note_positions(entries, mixture, mixture.plan.origin.step)
    return entries


def continued_sources(
    saved: TrainerState, mixture: Mixture, files: list[list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """A resumed run's records at its step: today's sources and files, each kept source's tokens carried over."""
    tokens = {entry["name"]: entry.get("tokens", 0) for entry in saved.sources}
    entries = initial_sources(mixture, files)
    for entry in entries:
        entry["tokens"] = tokens.get(entry["name"], 0)
    note_positions(entries, mixture, saved.step)
    return entries


def origin_record(origin: Origin, names: list[str]) -> dict[str, Any]:
    """TrainerState.mixture_origin of a plan (empty when it starts at step 0)."""
    if not origin.step:
        return {}
    return {"step": origin.step, "drawn": {name: int(d) for name, d in zip(names, origin.drawn, strict=True)}}


def note_positions(entries: list[dict[str, Any]], mixture: Mixture, step: int) -> None:
    """Each source's records given before `step`, and the epoch and cursor of its next record."""
    drawn = mixture.plan.counts(step)
    for entry, given, span in zip(entries, drawn, mixture.spans, strict=True):
        entry["samples"] = int(given)
        entry["epoch"], entry["cursor"] = divmod(int(given), span.records)


def source_row(mixture: Mixture, state: TrainerState, sums: list[float]) -> dict[str, Any]:
    """The row's per-source keys at `state.step`, from the window's reduced sums [loss S, units S, tokens S]
    (metrics/meter.py); adds the window's tokens to the state's per-source totals."""
    count = len(mixture.sources)
    losses, units, tokens = sums[:count], sums[count : 2 * count], sums[2 * count :]
    note_positions(state.sources, mixture, state.step)
    epochs = mixture.plan.epochs(state.step)
    row: dict[str, Any] = {}
    for s, entry in enumerate(state.sources):
        entry["tokens"] += int(tokens[s])
        name = entry["name"]
        row[f"mix/{name}/samples"] = entry["samples"]
        row[f"mix/{name}/tokens"] = entry["tokens"]
        row[f"mix/{name}/epoch"] = int(epochs[s])
        row[f"loss/{name}"] = losses[s] / units[s] if units[s] else None
    return row


def counted_sources(sources: SourceBatch, counts: bool) -> tuple[list[int], list[int]]:
    """A micro batch's per-source units and tokens, or zeros on a rank that does not count it (the ranks of
    a sequence-parallel group share one micro batch: its first rank counts it)."""
    if counts:
        return sources.units, sources.tokens
    return [0] * len(sources.units), [0] * len(sources.tokens)


def pair_losses(
    objective: ObjectiveConfig, scores: PairScores, sources: SourceBatch, global_norm: bool
) -> torch.Tensor:
    """Each source's summed pair loss [S] over its real pairs (a device tensor). With global normalisation
    dpo_nll's and orpo's pair terms leave out the NLL (it is normalised over the batch's tokens): here each pair gets
    its own, nll_weight x its chosen answer's NLL per token."""
    per_pair = scores.loss.detach()
    weight = nll_weight(objective)  # dpo_nll's and orpo's NLL term
    if weight and global_norm:
        per_pair = per_pair + weight * scores.chosen_nll.detach()
    groups = sources.groups.to(per_pair.device)
    totals = torch.zeros(len(sources.units), dtype=torch.float64, device=per_pair.device)
    return totals.index_add(0, groups, (per_pair * scores.valid).double())
