"""A mixture's micro batch by source: which source each supervised position (or pair) belongs to, and each
source's supervised units and tokens, all counted on the host where the batch is collated.

The forward sums each source's NLL at its labelled positions on the device (SupervisedLM's `label_groups`);
the meter adds those sums up without a host sync (metrics/meter.py), and `loss/<name>` is their sum over
the source's units at a logged step. The layouts are those of `collate_micro`: padded rows hold one example
each; packed rows the examples `plan_rows` puts in them, back to back (data/packing.py); the flat row of
flash-attention all examples in order; pair batches one entry per pair, in row order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dstrain.data.batches import IGNORE, Example, SourceBatch
from dstrain.data.packing import plan_rows
from dstrain.data.pairs import PairExample


def example_sources(
    examples: Sequence[Example], inputs: dict[str, torch.Tensor], sources: int, pack_to: int, flat: bool
) -> SourceBatch:
    """Per-position sources of an SFT micro batch laid out as `collate_micro` lays it out."""
    labels = inputs["labels"]
    groups = torch.zeros(labels.shape, dtype=torch.long)
    owners = [e.source for e in examples]
    lengths = [len(e.input_ids) for e in examples]
    if flat:
        groups[0] = torch.tensor(np.repeat(owners, lengths)) if examples else 0
    elif pack_to:
        for row, members in enumerate(plan_rows(lengths, pack_to)):
            groups[row, : sum(lengths[i] for i in members)] = torch.tensor(
                np.repeat([owners[i] for i in members], [lengths[i] for i in members])
            )
    else:
        groups[: len(owners)] = torch.tensor(owners, dtype=torch.long)[:, None]
    labelled = labels[:, 1:] != IGNORE
    units = np.bincount(groups[:, 1:][labelled].numpy(), minlength=sources)
    tokens = np.bincount(owners, weights=lengths, minlength=sources) if examples else np.zeros(sources)
    return SourceBatch(groups, units.astype(int).tolist(), tokens.astype(int).tolist())


def pair_sources(pairs: Sequence[PairExample], sources: int, shared: bool) -> SourceBatch:
    """Each real pair's source (a batch without one keeps its filler pair in source 0, with no units)."""
    owners = [p.source for p in pairs]
    prompt = 1 if shared else 2  # the prompt runs once per pair (plus the repeated token) or twice
    sizes = [
        prompt * len(p.prompt_ids) + int(shared) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
    ]
    units = np.bincount(owners, minlength=sources) if pairs else np.zeros(sources)
    tokens = np.bincount(owners, weights=sizes, minlength=sources) if pairs else np.zeros(sources)
    groups = torch.tensor(owners or [0], dtype=torch.long)
    return SourceBatch(groups, units.astype(int).tolist(), tokens.astype(int).tolist())
