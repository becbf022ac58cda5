"""The rendezvous before the process group: reach rank 0's store, then wait until every rank has arrived.

torch's own `env://` rendezvous waits for missing ranks with the *collective* timeout (10-30 min) and then
reports a C++ "Timed out waiting for clients" with no word on who is missing: the multi-node job that "hangs
at the first batch" (LLaMA-Factory #2470). Here every rank registers under its rank number, the wait has its
own, shorter bound (`distributed.rendezvous_timeout_s`), and the failure says which ranks never came and at
which address and port everybody was supposed to meet.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from dstrain.errors import DistributedError

if TYPE_CHECKING:
    import torch.distributed

    from dstrain.distributed.env import DistEnv

POLL_S = 0.25
# The launcher's node rank, where it says one: deepspeed's launch.py, torchrun, Slurm.
NODE_RANK_VARIABLES = ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID")


@dataclass(frozen=True)
class Member:
    """Where a rank runs: what a failure message names, and what its peers on the same node may signal."""

    host: str
    pid: int
    node: str  # the host, plus the launcher's node rank: two launcher nodes may share a host (containers)
    started: float  # the process's start time: with the pid, it names this process and no later one

    @classmethod
    def here(cls) -> Member:
        import psutil

        node_rank = next((os.environ[v] for v in NODE_RANK_VARIABLES if os.environ.get(v)), None)
        host = socket.gethostname()
        node = host if node_rank is None else f"{host}#node{node_rank}"
        return cls(host, os.getpid(), node, psutil.Process().create_time())

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> Member:
        return cls(**json.loads(raw))

    def __str__(self) -> str:
        return f"{self.host}, pid {self.pid}"


def member_key(rank: int) -> str:
    return f"{key_prefix()}joined/{rank}"


def key_prefix() -> str:
    """Namespace for this attempt's keys: torchrun's agent store outlives worker restarts, so a restarted
    attempt must not count the arrivals (or heartbeats) of the one before."""
    return f"dstrain/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def uses_agent_store() -> bool:
    """Under torchrun the agent already serves the store at MASTER_ADDR:MASTER_PORT; rank 0 only connects."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def connect_store(env: DistEnv, timeout_s: float, *, serve: bool | None = None) -> torch.distributed.TCPStore:
    """Rank 0 serves the store (unless a launcher agent does); every other rank connects, retrying until
    `timeout_s` so that nodes may start in any order."""
    import torch.distributed

    serve = env.rank == 0 and not uses_agent_store() if serve is None else serve
    try:
        return torch.distributed.TCPStore(
            env.master_addr,
            env.master_port,
            env.world_size if serve else None,
            serve,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
    except Exception as exc:  # torch raises DistNetworkError / DistStoreError / RuntimeError here
        raise DistributedError(store_failure(env, timeout_s, serve, exc)) from exc


def store_failure(env: DistEnv, timeout_s: float, serve: bool, exc: BaseException) -> str:
    where = f"{env.master_addr}:{env.master_port}"
    cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    if serve:
        return (
            f"rank 0 could not open the rendezvous at {where} ({cause}). The port is probably taken by another "
            "job: pick a free one with --master_port (deepspeed, torchrun) or MASTER_PORT."
        )
    return (
        f"rank {env.rank} could not reach rank 0's rendezvous at {where} within {timeout_s:.0f} s ({cause}). "
        f"Check that rank 0 is running, that every node was started with the same --master_addr and "
        f"--master_port ({where}), and that {env.master_addr} accepts TCP connections on that port from "
        f"this host ({socket.gethostname()})."
    )


def wait_for_all_ranks(store: torch.distributed.Store, env: DistEnv, timeout_s: float) -> None:
    """Register this rank, then wait until all `world_size` ranks have registered (or name who is missing)."""
    prefix = key_prefix()
    store.set(member_key(env.rank), Member.here().encode())  # set before counted: all present at the end
    arrived = store.add(f"{prefix}joined", 1)
    deadline = time.monotonic() + timeout_s
    while arrived < env.world_size:
        if time.monotonic() > deadline:
            missing = [r for r in range(env.world_size) if not store.check([member_key(r)])]
            raise DistributedError(missing_ranks(env, timeout_s, missing))
        time.sleep(POLL_S)
        arrived = store.add(f"{prefix}joined", 0)


def missing_ranks(env: DistEnv, timeout_s: float, missing: list[int]) -> str:
    where = f"{env.master_addr}:{env.master_port}"
    shown = ", ".join(map(str, missing[:16])) + (
        f" and {len(missing) - 16} more" if len(missing) > 16 else ""
    )
    return (
        f"rank {env.rank}: only {env.world_size - len(missing)} of {env.world_size} ranks reached the "
        f"rendezvous at {where} within {timeout_s:.0f} s; missing: rank {shown}. A missing rank was not "
        f"started, is still starting (raise distributed.rendezvous_timeout_s), or was given another "
        f"--master_addr/--master_port than {where}."
    )


def join(env: DistEnv, backend: str, rendezvous_timeout_s: float, collective_timeout_s: float) -> None:
    """Rendezvous with every rank, then create the default process group on the same store."""
    import torch.distributed

    store = connect_store(env, rendezvous_timeout_s)
    wait_for_all_ranks(store, env, rendezvous_timeout_s)
    store.set_timeout(datetime.timedelta(seconds=collective_timeout_s))
    torch.distributed.init_process_group(
        backend,
        store=torch.distributed.PrefixStore(f"{key_prefix()}pg", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
