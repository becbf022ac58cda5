"""Cross-rank agreement over torch.distributed: sums, byte gathers, barriers, and `agreed` blocks that fail on
every rank at once. Each is a no-op in a single process, so callers need no `if world > 1` branches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dstrain.errors import DistributedError


def all_ranks_ok(ok: bool) -> bool:
    """True only if every rank passes ok=True. A collective: every rank must call it."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=comm_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.SUM)
    return int(flag.item()) == 0


def first_failed_rank(ok: bool) -> int | None:
    """The lowest rank that passes ok=False, or None when every rank passes True. A collective."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return None if ok else 0
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    # world - rank for a failing rank, 0 for a passing one: the maximum names the lowest failing rank
    flag = torch.tensor([0 if ok else world - rank], dtype=torch.int64, device=comm_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    top = int(flag.item())
    return None if top == 0 else world - top


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values = values.to(comm_device())
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def all_gather_bytes(blob: bytes) -> list[bytes]:
    """Every rank's `blob`, in rank order, on every rank (byte tensors, so nothing is pickled)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [blob]
    world, device = torch.distributed.get_world_size(), comm_device()
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    if longest == 0:
        return [b""] * world
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if blob:  # torch.frombuffer refuses an empty buffer: a rank with nothing to say sends zeros only
        mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(parts, mine)
    return [bytes(p[: int(s.item())].cpu().numpy()) for p, s in zip(parts, sizes, strict=True)]


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def comm_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@contextmanager
def agreed(what: str) -> Iterator[None]:
    """Run a block on every rank; if it fails on any rank, fail it on all ranks: the rank that failed raises
    its own error, every other rank one naming the (lowest) rank that failed.

    Without this a rank that raises leaves the others waiting in the next collective until the timeout.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:
        error = exc
    failed = first_failed_rank(error is None)
    if error is not None:
        raise error
    if failed is not None:
        from dstrain.distributed.ranklog import peer_log

        log = peer_log(failed)
        where = f"; its log: {log}" if log is not None else ""
        raise DistributedError(f"{what} failed on rank {failed} (its own message says why{where})")
