"""The first-batch self-check: the run's log-probs against the model's own forward, before step 1.

The chunked head reproduces what a family does around its output head from a table (families.py). A model
that does something else there (remote code that claims a known model_type, a transformers release that
changes a family, `model.head: chunked` forced on a model it does not fit) would train against wrong logits
without a word. So before the first optimizer step every rank computes, on its first micro batch, the
log-probs at up to CHECK_POSITIONS supervised positions both ways, and the run stops with one message when
they differ by more than the precision of the model's dtype explains.

Packed rows and shared-prompt pairs add a second comparison: the model's own forward on the batch as laid
out (its 4-D record masks, windows.py) against the model's own forward on each checked record in its own
padded row with a plain 2-D mask, the reference a user gets at inference. A mask that lets records see each
other, or misses a layer's sliding window, stops the run here.

Cost: one extra forward of one micro batch without backward, once per process (bench/head_bench.py); with
packed rows or shared-prompt pairs, one more of the checked records in their own rows.
"""

from __future__ import annotations

from typing import Any

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


def layout(inputs: dict[str, Any]) -> str | None:
    """The config key of a batch's record layout, or None for padded rows (nothing to rebuild)."""
    if inputs.get("label_rows") is not None:
        return "data.share_prompt"
    mask = inputs.get("attention_mask")
    if (mask is not None and mask.dim() == 4) or inputs.get("cu_seq_lens_q") is not None:
        return "data.packing"
    return None


def rebuilds_rows(inputs: dict[str, Any]) -> bool:
    """Whether the check rebuilds each record's own row: packed rows and shared-prompt pairs."""
    return layout(inputs) is not None


def own_rows(
    input_ids: torch.Tensor, position_ids: torch.Tensor, picked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each record that holds a checked position, alone in its own right-padded row: (input_ids [R, n],
    attention_mask [R, n], the checked positions [K] as flat indices into those rows).

    A record is read from the position ids, never from the mask under test: the row of position t holds,
    for each p = 0..pos[t], the latest token at or before t that carries position p. In a packed row that
    is t's own sample (positions restart per sample); in a shared-prompt row, the prompt then t's own
    branch (the branch between them carries positions past the prompt only). A record is identified by
    where its last run of consecutive positions starts, and rebuilt once up to its last checked position.
    Every rank gets at least one row, so every rank runs the forward (ZeRO-3 gathers in it).
    """
    ids, pos, flat = input_ids.cpu(), position_ids.cpu(), picked.cpu()
    width = ids.shape[1]
    where = [(int(i) // width, int(i) % width) for i in flat]
    keys = [(r, _run_start(pos[r], t)) for r, t in where]
    last: dict[tuple[int, int], int] = {}
    for key, (_, t) in zip(keys, where, strict=True):
        last[key] = max(last.get(key, t), t)
    records = [ids[r][_record(pos[r], t)] for (r, _), t in last.items()] or [ids[0, :1]]
    length = max(len(tokens) for tokens in records)
    rows = torch.zeros((len(records), length), dtype=torch.long)
    mask = torch.zeros((len(records), length), dtype=torch.long)
    for i, tokens in enumerate(records):
        rows[i, : len(tokens)], mask[i, : len(tokens)] = tokens, 1
    order = {key: i for i, key in enumerate(last)}
    index = torch.tensor(
        [order[key] * length + int(pos[r, t]) for key, (r, t) in zip(keys, where, strict=True)]
    )
    device = input_ids.device
    return rows.to(device), mask.to(device), index.to(device, torch.long)


def _run_start(pos: torch.Tensor, t: int) -> int:
    """Where the run of consecutive positions that ends at t starts."""
    breaks = ((pos[1 : t + 1] - pos[:t]) != 1).nonzero()
    return int(breaks[-1]) + 1 if breaks.numel() else 0


def _record(pos: torch.Tensor, t: int) -> torch.Tensor:
    """Indices of t's record in its own order: for each position 0..pos[t] the latest index <= t holding it.

    A position no earlier token holds (a broken layout) takes index 0: the rebuilt row is then wrong and the
    check fails, as it should.
    """
    seen = pos[: t + 1]
    keep = seen <= seen[t]
    latest = torch.zeros(int(seen[t]) + 1, dtype=torch.long)
    return latest.scatter_reduce(0, seen[keep], torch.arange(t + 1)[keep], reduce="amax")


def rows_verdict(
    mean_diff: float, largest_logit: float, positions: int, dtype: torch.dtype, model: str, key: str | None
) -> None:
    """Raise one ConfigError when the batch as laid out (packed rows, shared-prompt pairs) gives other
    log-probs than each record in its own row."""
    if positions == 0 or key is None:
        return
    allowed = tolerance(dtype, largest_logit)
    if mean_diff <= allowed:
        return
    raise ConfigError(
        [
            f"{key}: the log-probs of {model} on the first batch as laid out ({key}) differ from each record "
            f"in its own padded row by {mean_diff:.3g} on average over {positions} supervised positions "
            f"(allowed {allowed:.2g} in {str(dtype).removeprefix('torch.')}): the attention masks dstrain "
            f"builds do not give this model its own attention. Set {key}=false (each record in its own "
            "padded row) and report the model class"
        ]
    )
