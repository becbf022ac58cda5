"""Ulysses sequence parallelism (train.sequence_parallel_size N): the groups, the `mpu` DeepSpeed takes,
each rank's slice of a micro batch, and the loss sums over a group.

Groups are N consecutive ranks [g*N, (g+1)*N) (on one node, where the all-to-alls are cheap). The N ranks of
a group read the SAME micro batch and each keeps a contiguous 1/N of every row; data-parallel rank = rank //
N, data-parallel world = world / N. The attention that exchanges between them is model/ulysses.py.

How DeepSpeed (0.19.8) treats this `mpu`: it sees `initialize_sequence_parallel` and then partitions ZeRO
state and reduces gradients over `get_sequence_data_parallel_group()` (here: all ranks), dividing by
world / N, so gradients are summed over a group and averaged over the data-parallel ranks. Each rank
therefore backprops only its own tokens' part of the loss (see `group_sum`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from dstrain.data.batches import IGNORE
from dstrain.errors import ConfigError

_ACTIVE: SequenceGroups | None = None  # this process's groups once built (None: sequence parallelism off)


def data_parallel_rank(rank: int, size: int) -> int:
    """The data-parallel rank (which micro batches a rank reads) of global `rank` in groups of `size`."""
    return rank // size


def group_ranks(rank: int, size: int) -> list[int]:
    """The global ranks of `rank`'s sequence-parallel group: `size` consecutive ranks."""
    first = rank - rank % size
    return list(range(first, first + size))


def check_heads(heads: int | None, kv_heads: int | None, size: int) -> list[str]:
    """Problems of splitting attention heads over `size` ranks (GQA: kv heads split or replicate evenly)."""
    if size <= 1 or heads is None:
        return []
    if heads % size:
        return [
            f"train.sequence_parallel_size={size} does not divide the model's {heads} attention heads: "
            "use a divisor of the head count"
        ]
    kv = kv_heads or heads
    if kv % size and size % kv:
        return [
            f"train.sequence_parallel_size={size} and the model's {kv} key/value heads: one must divide the "
            "other"
        ]
    return []


class SequenceGroups:
    """The `mpu` handed to deepspeed.initialize(mpu=...) for Ulysses, and the group the loss sums over.

    Every rank builds it (dist.new_group is collective), in the same order.
    """

    def __init__(self, size: int) -> None:
        world, rank = tdist.get_world_size(), tdist.get_rank()
        if size < 1 or world % size:
            raise ConfigError([f"train.sequence_parallel_size={size} does not divide the world size {world}"])
        self.size = size
        self.sp_group: Any = None
        for g in range(world // size):
            group = tdist.new_group(list(range(g * size, (g + 1) * size)))
            if rank // size == g:
                self.sp_group = group
        self.world_group = tdist.new_group(list(range(world)))

    def initialize_sequence_parallel(self, *args: Any) -> None:  # DeepSpeed's marker of an SP mpu
        raise RuntimeError("the sequence-parallel groups are already built")

    def get_sequence_parallel_group(self) -> Any:
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.size

    def get_sequence_parallel_rank(self) -> int:
        return tdist.get_rank(group=self.sp_group)

    def get_sequence_data_parallel_group(self) -> Any:
        return self.world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return tdist.get_world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return tdist.get_rank()

    # what DeepSpeed's own parallel_state_sp aliases; not used by the engine for an SP mpu
    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank


def start(size: int) -> SequenceGroups | None:
    """Build this process's groups (a collective; after the process group starts); None when size is 1."""
    global _ACTIVE
    _ACTIVE = SequenceGroups(size) if size > 1 else None
    return _ACTIVE


def active() -> SequenceGroups | None:
    return _ACTIVE


def rank_in_group() -> int:
    """This rank's position in its group (0 without sequence parallelism): rank 0 of a group reports."""
    return 0 if _ACTIVE is None else _ACTIVE.get_sequence_parallel_rank()


def group_total(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of `x` over the group, no gradient (token counts, reference log-probs)."""
    total = x.detach().clone()
    tdist.all_reduce(total, group=group)
    return total


def group_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The group's sum of `x` as the value, with gradient 1 to this rank's own `x` only.

    Every rank then computes the same full loss from it and backprops it: each rank's backward gives the
    gradient through its own tokens (reaching the others' through the attention's all-to-all backward), and
    DeepSpeed's sum of gradients over the group completes it. A differentiable all-reduce
    (torch.distributed.nn) would also sum the gradients: N times too large.
    """
    return x + (group_total(x, group) - x.detach())


@dataclass(frozen=True)
class Slice:
    """One rank's part of a micro batch. `targets` are the labels shifted left by one (the token each
    position predicts), cut AFTER the shift so the last position of a slice keeps its target."""

    input_ids: torch.Tensor  # [B, s]
    position_ids: torch.Tensor  # [B, s]: global positions (RoPE is applied before the exchange)
    targets: torch.Tensor  # [B, s], IGNORE where nothing is predicted
    target_rows: torch.Tensor | None  # [B, s]: the answer row of each target (shared-prompt pairs)
    attention_mask: torch.Tensor | None  # the FULL sequence's: None (causal) or [B, 1, S, S] bool
    padding: torch.Tensor | None  # a full [B, S] padding mask that is not right padding, else None


def shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    return F.pad(x[:, 1:], (0, 1), value=fill)


def pad_mask(mask: torch.Tensor | None, extra: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(full 4D mask or None, full 2D padding mask or None) for the sequence padded by `extra` positions."""
    if mask is None:
        return None, None
    if mask.dim() == 2:
        if bool((mask[:, 1:] <= mask[:, :-1]).all()):  # right padding: causal alone is exact for real tokens
            return None, None
        return None, F.pad(mask, (0, extra), value=0)
    keep = mask if mask.dtype == torch.bool else mask == 0
    if not extra:
        return keep, None
    keep = F.pad(keep, (0, extra, 0, extra), value=False)
    length = keep.shape[-1]
    added = torch.arange(length - extra, length, device=keep.device)
    keep[..., added, added] = True  # each added position sees itself: no empty row (NaN)
    return keep, None


def shard_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None,
    label_rows: torch.Tensor | None,
    rank: int,
    size: int,
) -> Slice:
    """Rank `rank`'s slice of a collated micro batch; rows are padded to a multiple of `size` first (pad id
    0 and label IGNORE at the end: later positions, which no real token attends)."""
    batch, length = input_ids.shape
    extra = -length % size
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    if extra:
        more = position_ids[:, -1:] + torch.arange(1, extra + 1, device=input_ids.device)
        position_ids = torch.cat([position_ids, more], dim=1)
    mask, padding = pad_mask(attention_mask, extra)
    width = (length + extra) // size

    def cut(x: torch.Tensor, fill: int) -> torch.Tensor:
        return F.pad(x, (0, extra), value=fill)[:, rank * width : (rank + 1) * width]

    rows = None if label_rows is None else cut(shift_left(label_rows, 0), 0)
    return Slice(
        cut(input_ids, 0),
        position_ids[:, rank * width : (rank + 1) * width],
        cut(shift_left(labels, IGNORE), IGNORE),
        rows,
        mask,
        padding,
    )


def check_bucket(ds: dict[str, Any], trainable: list[torch.nn.Parameter]) -> None:
    """ZeRO-3 + sequence parallelism: every trainable tensor must fit one reduce bucket, or DeepSpeed 0.19.8
    reduces it on the path that divides its gradient by the whole world (N times too small)."""
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage") != 3 or int(ds.get("sequence_parallel_size", 1)) <= 1 or not trainable:
        return
    largest = max(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
    bucket = int(zero.get("reduce_bucket_size", 500_000_000))
    if largest > bucket:
        raise ConfigError(
            [
                f"zero_optimization.reduce_bucket_size={bucket} is smaller than the largest trainable tensor "
                f"({largest} elements): with ZeRO-3 and train.sequence_parallel_size > 1 its gradient would be "
                f"scaled wrongly; set reduce_bucket_size to at least {largest} in the ZeRO JSON"
            ]
        )
