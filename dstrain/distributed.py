"""Launcher environment -> DistEnv, process-group init with timeouts, and cross-rank agreement helpers.

Works the same under `deepspeed`, `torchrun`, Slurm's `srun` (when the launcher exported the usual variables)
and a plain single process, for which a private loopback rendezvous is set up.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dstrain.errors import DistributedError

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistEnv:
    """Read the launcher's variables; without any, describe a single local process."""
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}: check the launcher's environment")
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise DistributedError(
            f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: start the ranks with deepspeed, "
            "torchrun or `dstrain train --num-gpus N`, or export both on every rank"
        )
    return DistEnv(
        rank=rank,
        local_rank=_int_env("LOCAL_RANK", 0),
        world_size=world,
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int_env("MASTER_PORT", 0),
    )


def env_rank() -> int:
    """This process's rank from the environment, without validation (for deciding who prints)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def init_process_group(
    env: DistEnv, rendezvous_timeout_s: float = 300, collective_timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistEnv:
    """Rendezvous (bounded, naming missing ranks), then start the process group (nccl on CUDA, gloo on CPU)
    and hand it to DeepSpeed's comm layer."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from dstrain import rendezvous

    port = env.master_port or free_port()
    os.environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(port),
    )
    env = DistEnv(env.rank, env.local_rank, env.world_size, env.master_addr, port)
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(env.local_rank)
    elif env.world_size == 1:
        skip_cpu_shm_kernel()
    backend = accelerator.communication_backend_name()
    rendezvous.join(env, backend, rendezvous_timeout_s, collective_timeout_s)
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    # torch.distributed is up: DeepSpeed adopts the group (and sets up its CPU shared-memory all-reduce).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    if accelerator.device_name() == "cpu" and env.world_size > 1:
        release_shm_name(env)
    return env


def release_shm_name(env: DistEnv) -> None:
    """Unlink this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>` (69 MB) per rank and
    never unlinks it: every multi-rank CPU run, finished or killed, left 69 MB per rank of RAM-backed files
    behind. The mappings stay valid after the unlink; the memory is freed when the last rank exits.
    """
    barrier()  # every rank has finished mapping its peers' buffers (they open them by name)
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_{env.master_port}_{env.rank}"
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()


def skip_cpu_shm_kernel() -> None:
    """A single CPU process has nothing to all-reduce: skip DeepSpeed's shared-memory comm kernel.

    DeepSpeed JIT-compiles it on first use (over a minute on a small machine), which would more than
    double the time of the bundled demo on a fresh install.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def all_ranks_ok(ok: bool) -> bool:
    """True only if every rank passes ok=True. A collective: every rank must call it."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_comm_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.SUM)
    return int(flag.item()) == 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values = values.to(_comm_device())
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def all_gather_bytes(blob: bytes) -> list[bytes]:
    """Every rank's `blob`, in rank order, on every rank (byte tensors, so nothing is pickled)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [blob]
    world, device = torch.distributed.get_world_size(), _comm_device()
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(parts, mine)
    return [bytes(p[: int(s.item())].cpu().numpy()) for p, s in zip(parts, sizes, strict=True)]


def any_rank(flag: bool) -> bool:
    """True if `flag` is set on any rank. A collective: every rank must call it."""
    return not all_ranks_ok(not flag)


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@contextmanager
def agreed(what: str) -> Iterator[None]:
    """Run a block on every rank; if it fails on any rank, fail it on all ranks with one message.

    Without this a rank that raises leaves the others waiting in the next collective until the timeout.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:
        error = exc
    if not all_ranks_ok(error is None):
        if error is not None:
            raise error
        raise DistributedError(f"{what} failed on another rank; see that rank's log for the cause")
    if error is not None:
        raise error


def shutdown() -> None:
    """Stop the heartbeat, wait for every rank, leave the process group. A collective: all ranks call it."""
    from dstrain import heartbeat

    heartbeat.stop()  # first: past the barrier, rank 0 (which serves the store) may exit at any moment
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()
