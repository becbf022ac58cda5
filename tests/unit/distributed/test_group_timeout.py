"""`distributed.collective_timeout_s` bounds the collectives of groups made after the default one.

DeepSpeed reduces gradients on its own copy of the world group, a `new_group` without a timeout: torch gave
it its default (30 min on gloo), and a collective stuck on a frozen rank ignored the run's timeout. Two
forked processes play the ranks; rank 1 stops itself (SIGSTOP) after one collective.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import signal
import time

import torch
import torch.distributed

from dstrain.distributed.env import free_port
from dstrain.distributed.group import bound_later_groups

TIMEOUT_S = 3


def rank_main(rank: int, port: int, outcome) -> None:
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=30)
    )
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    bound_later_groups(timeout)
    group = torch.distributed.new_group([0, 1])  # as DeepSpeed's groups._clone_world_group does: no timeout
    values = torch.ones(4)
    torch.distributed.all_reduce(values, group=group)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    began = time.monotonic()
    try:
        torch.distributed.all_reduce(values, group=group)
        outcome.send(("returned", time.monotonic() - began))
    except RuntimeError as exc:
        outcome.send((str(exc), time.monotonic() - began))  # a pipe: sent before the os._exit below
    os._exit(0)


def test_a_later_group_times_out_after_the_collective_timeout():
    context, port = multiprocessing.get_context("fork"), free_port()
    received, outcome = context.Pipe(duplex=False)
    ranks = [context.Process(target=rank_main, args=(r, port, outcome), daemon=True) for r in (0, 1)]
    for process in ranks:
        process.start()
    try:
        assert received.poll(120), "no outcome"  # hang guard: torch's own default would be 30 min
        message, waited = received.recv()
    finally:
        for process in ranks:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(process.pid, sig)
            process.join()
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in message
    assert waited < 60  # a hang guard, not a speed test: 3 s, not torch's 30 min default
