"""Start and leave the process group: a bounded rendezvous that names missing ranks, then torch.distributed
(nccl on CUDA, gloo on CPU) handed to DeepSpeed's comm layer; and the CPU shared-memory clean-up around it."""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch

from dstrain.distributed import heartbeat, rendezvous
from dstrain.distributed.collectives import barrier
from dstrain.distributed.env import DistEnv, free_port

DEFAULT_TIMEOUT_S = 600


def init_process_group(
    env: DistEnv, rendezvous_timeout_s: float = 300, collective_timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistEnv:
    """Rendezvous (bounded, naming missing ranks), then start the process group (nccl on CUDA, gloo on CPU)
    and hand it to DeepSpeed's comm layer."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

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
    bound_later_groups(timeout)
    # torch.distributed is up: DeepSpeed adopts the group (and sets up its CPU shared-memory all-reduce).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    if accelerator.device_name() == "cpu" and env.world_size > 1:
        release_shm_name(env)
    return env


def bound_later_groups(timeout: datetime.timedelta) -> None:
    """Give the process groups created later without a timeout the run's collective timeout.

    DeepSpeed reduces gradients on its own copy of the world group (`groups._clone_world_group`, a
    `new_group` without a timeout), and builds expert and sequence groups the same way: torch gives such a
    group its default (30 min on gloo, 10 min on NCCL), not the default group's, so a collective stuck on a
    frozen rank ignored `distributed.collective_timeout_s`. torch reads the default from these two module
    attributes each time it builds a group.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:  # None: torch built without NCCL
        distributed_c10d.default_pg_nccl_timeout = timeout


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


def shutdown() -> None:
    """Stop the heartbeat, wait for every rank, leave the process group. A collective: all ranks call it."""
    heartbeat.stop()  # first: past the barrier, rank 0 (which serves the store) may exit at any moment
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()
