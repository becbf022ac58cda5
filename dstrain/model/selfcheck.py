"""The first-batch self-check: the run's log-probs against the model's own forward, before step 1.

The chunked head reproduces what a family does around its output head from a table (families.py). A model
that does something else there (remote code that claims a known model_type, a transformers release that
changes a family, `model.head: chunked` forced on a model it does not fit) would train against wrong logits
without a word. So before the first optimizer step every rank computes, on its first micro batch, the
log-probs at up to CHECK_POSITIONS supervised positions both ways, and the run stops with one message when
they differ by more than the precision of the model's dtype explains.

Cost: one extra forward of one micro batch without backward, once per process (bench/head_bench.py).
"""

from __future__ import annotations

import torch

from dstrain.errors import ConfigError

CHECK_POSITIONS = 16


def spread(total: int, count: int) -> torch.Tensor:
    """Up to `count` indices spread evenly over range(total): first, last and between."""
    if total <= count:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def tolerance(dtype: torch.dtype, largest_logit: float) -> float:
    """How far the two paths may differ, as a mean over positions.

    Both run the same decoder; the head and transform differ only in rounding: the model's own forward
    applies its transform in the model's dtype, the chunked head in fp32. A few units of the dtype's
    epsilon at the largest logit cover that; a missed transform (a scale of 1/8, a soft-cap at 30) moves
    the log-probs by whole units.
    """
    return 1e-4 + 4 * torch.finfo(dtype).eps * max(1.0, largest_logit)


def verdict(mean_diff: float, largest_logit: float, positions: int, dtype: torch.dtype, model: str) -> None:
    """Raise one ConfigError when the paths disagree; the message names the model and the difference."""
    if positions == 0:
        return
    allowed = tolerance(dtype, largest_logit)
    if mean_diff <= allowed:
        return
    raise ConfigError(
        [
            f"model.head: the log-probs dstrain computes for {model} differ from the model's own forward by "
            f"{mean_diff:.3g} on average over {positions} supervised positions of the first batch "
            f"(allowed {allowed:.2g} in {str(dtype).removeprefix('torch.')}): the model transforms its logits "
            "in a way the chunked head does not know. Set model.head: exact (the model's own forward) and "
            "report the model class"
        ]
    )
