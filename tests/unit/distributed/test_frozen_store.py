"""A rendezvous store served by a frozen process (SIGSTOP: its sockets stay open, nothing is answered).

The store's server runs in a child process that the test stops and resumes; the heartbeat plays rank 1 in
this process. The launcher-level cases (real ranks frozen mid-step) are in tests/distributed/test_frozen.py.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import time
from datetime import timedelta

import psutil
import pytest
import torch.distributed

from dstrain.distributed.deadlinestore import DeadlineStore, StoreUnresponsive
from dstrain.distributed.env import DistEnv, free_port
from dstrain.distributed.heartbeat import Heartbeat
from dstrain.distributed.rendezvous import key_prefix
from tests.unit.distributed.test_heartbeat import register


def serve_and_beat(port: int, ready) -> None:
    """Rank 0: serve the store and beat (bump its heartbeat counter) twice a second, for up to a minute."""
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, None, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    ready.set()
    for _ in range(120):
        store.add(f"{key_prefix()}hb/beat/0", 1)
        time.sleep(0.5)
    os._exit(0)


@pytest.fixture
def store_process():
    """(child process serving a TCPStore, its port); never left stopped or running after the test. Forked:
    a fresh interpreter would spend seconds importing torch."""
    port, context = free_port(), multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=serve_and_beat, args=(port, ready), daemon=True)
    child.start()
    try:
        assert ready.wait(60)
        yield child, port
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)
        child.join()


def stop(child, sig: signal.Signals = signal.SIGSTOP) -> None:
    os.kill(child.pid, sig)


def client(port: int) -> torch.distributed.TCPStore:
    return torch.distributed.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=10))


def test_calls_to_a_frozen_store_end_within_the_deadline_and_resume_after_it(store_process):
    child, port = store_process
    store = DeadlineStore(lambda: client(port), deadline_s=1.0)
    assert store.add("counter", 1) == 1
    stop(child)
    began = time.monotonic()
    with pytest.raises(StoreUnresponsive) as first:
        store.add("counter", 1)  # a plain TCPStore client waits here forever
    assert time.monotonic() - began < 10  # hang guard: the deadline is 1 s
    with pytest.raises(StoreUnresponsive) as second:
        store.check(["counter"])  # the first call is still unanswered: fail at once, since the same moment
    assert second.value.since == first.value.since
    stop(child, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while True:  # the unanswered add completes once the server runs again; then calls go through
        try:
            assert store.add("counter", 0) == 2
            break
        except StoreUnresponsive:
            assert time.monotonic() < deadline, "the store never answered again after SIGCONT"
            time.sleep(0.2)


def heartbeat_of_rank_1(child: multiprocessing.Process, port: int, tmp_path, *, same_node: bool) -> Heartbeat:
    """Rank 1's heartbeat in this process; rank 0 is the store's process, on this node or another."""
    store = client(port)
    register(store, 0, pid=child.pid) if same_node else register(store, 0, host="node-a")
    register(store, 1)
    beat = Heartbeat(DistEnv(1, 1, 2, "127.0.0.1", port), 3, tmp_path)
    beat.exiting = True  # a verdict must not os._exit the test process
    return beat.start()


def test_a_short_pause_ends_nothing_a_frozen_rank_0_on_this_node_is_named_and_killed(store_process, tmp_path):
    child, port = store_process
    rank1 = heartbeat_of_rank_1(child, port, tmp_path, same_node=True)
    try:
        stop(child)
        time.sleep(1.5)  # half the 3 s timeout
        stop(child, signal.SIGCONT)
        assert not rank1.found.wait(4)  # no verdict: the heartbeat goes on
        assert rank1._thread.is_alive() and child.is_alive()

        stop(child)  # now for good
        assert rank1.found.wait(30)  # hang guard; the verdict comes after the 3 s timeout
        verdict = rank1.verdict
        named = f"rank 0 ({socket.gethostname()}, pid {child.pid}) stopped responding: the rendezvous store"
        assert f"{named} it serves at 127.0.0.1:{port} has not answered for" in verdict
        assert "store unresponsive" in verdict and "stopped (SIGSTOP" in verdict and "SIGKILL" in verdict
        assert f"{tmp_path}/logs/rank-00000.log" in verdict
        child.join(timeout=10)
        assert child.exitcode == -signal.SIGKILL  # ended by its peer: no 30 s wait on a SIGTERM
    finally:
        rank1.stop()


def test_frozen_rank_0_on_another_node_is_named_and_left_alone(store_process, tmp_path):
    child, port = store_process
    rank1 = heartbeat_of_rank_1(child, port, tmp_path, same_node=False)
    stop(child)
    try:
        assert rank1.found.wait(30)
        assert "rank 0 (node-a, pid" in rank1.verdict and "store unresponsive" in rank1.verdict
        assert "frozen or its node hangs" in rank1.verdict
        assert psutil.Process(child.pid).status() == psutil.STATUS_STOPPED  # not this rank's to kill
    finally:
        rank1.stop()
