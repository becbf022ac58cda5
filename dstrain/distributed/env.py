"""What the launcher said: rank, local rank, world size and the rendezvous address, as one `DistEnv`.

Works the same under `deepspeed`, `torchrun`, Slurm's `srun` (when the launcher exported the usual variables)
and a plain single process, for which a private loopback rendezvous is set up.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from dstrain.errors import DistributedError


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


def first_on_path(directory: str, path: str) -> str:
    """PATH with `directory` first and nowhere else (os.pathsep-joined, as in the environment)."""
    rest = [p for p in path.split(os.pathsep) if p and p != directory] if path else []
    return os.pathsep.join([directory, *rest])
