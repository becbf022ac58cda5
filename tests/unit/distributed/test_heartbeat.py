"""The heartbeat's verdicts, on a real TCPStore in this process: each `Heartbeat` plays one rank.

The launcher-level behaviour (real ranks killed and frozen) is in tests/distributed/test_faults.py; here the
cases that one machine cannot stage with processes: a rank on *another* host that goes silent, a rank that
reports an error, rank 0's store disappearing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psutil
import pytest
import torch.distributed

from dstrain.distributed import heartbeat
from dstrain.distributed.env import DistEnv, free_port
from dstrain.distributed.heartbeat import FAST_S, Heartbeat
from dstrain.distributed.rendezvous import Member, member_key


@pytest.fixture
def server():
    port = free_port()
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, 2, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    yield store, port


def register(store, rank: int, pid: int | None = None, host: str | None = None) -> Member:
    """What the rendezvous registers for a rank: this process by default, else `pid` (on this node) or a
    process on `host` (another node). Both ranks run in this process: rank 1 is registered on another node
    unless told otherwise, so that no verdict ever signals the test process."""
    member = Member.here()
    if pid is not None:
        member = Member(member.host, pid, member.node, psutil.Process(pid).create_time())
    if host is not None:
        member = Member(host, member.pid, host, member.started)
    store.set(member_key(rank), member.encode())
    return member


def ranks(port: int, tmp_path, timeout_s: float = 60) -> tuple[Heartbeat, Heartbeat]:
    beats = [Heartbeat(DistEnv(r, r, 2, "127.0.0.1", port), timeout_s, tmp_path) for r in (0, 1)]
    for beat in beats:
        beat.exiting = True  # a verdict must not os._exit the test process
    return beats[0], beats[1]


def silence(beat: Heartbeat) -> None:
    """Stop beating without the goodbye a finishing rank says: what a dead or frozen rank looks like."""
    beat._stopped.set()
    beat._thread.join()


def test_silent_rank_on_another_host_is_named_once_a_rank_failed(server, tmp_path):
    store, port = server
    register(store, 0), register(store, 1, host="other-node")  # not on this node: only its silence can tell
    rank0, rank1 = ranks(port, tmp_path)
    rank0.start(), rank1.start()
    try:
        silence(rank1)
        verdict = rank0.explain(RuntimeError("Connection reset by peer"))  # rank 0's collective broke
        assert verdict is not None
        assert "rank 1 (other-node, pid" in verdict and "stopped responding" in verdict
        assert f"{tmp_path}/logs/rank-00001.log" in verdict
    finally:
        rank0.stop()


def test_rank_that_reports_an_error_is_named_with_it(server, tmp_path):
    store, port = server
    register(store, 0), register(store, 1, host="other-node")
    rank0, rank1 = ranks(port, tmp_path)
    rank0.start(), rank1.start()
    try:
        rank1.report(ValueError("bad shard on this rank"))
        assert rank0.found.wait(FAST_S + 5)
        assert "rank 1 (" in rank0.verdict and "failed: ValueError: bad shard on this rank" in rank0.verdict
        assert rank1.found.wait(FAST_S + 5)  # every rank learns the verdict through the store
        assert rank1.verdict == rank0.verdict
    finally:
        rank0.stop(), rank1.stop()


def test_dead_process_on_this_host_is_named_without_waiting_for_silence(server, tmp_path):
    store, port = server
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    register(store, 0), register(store, 1, pid=victim.pid)  # rank 1 "is" that process, on this node
    rank0, _ = ranks(port, tmp_path, timeout_s=600)
    rank0.start()
    try:
        victim.kill()
        victim.wait()
        assert rank0.found.wait(5)  # well before any silence limit
        assert "rank 1 (" in rank0.verdict and f"pid {victim.pid}) died" in rank0.verdict
    finally:
        rank0.stop()


def test_rank_0_gone_means_its_store_is_gone(tmp_path):
    port = free_port()
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, 2, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    register(store, 0, host="node-a"), register(store, 1)  # rank 0 on another node: only the store can tell
    rank1 = Heartbeat(DistEnv(1, 1, 2, "127.0.0.1", port), 60, tmp_path)
    rank1.exiting = True
    rank1.start()
    try:
        del store  # rank 0's process, and the store it served, are gone
        assert rank1.found.wait(FAST_S + 15)
        assert "rank 0 (node-a, pid" in rank1.verdict and ") died: the rendezvous store" in rank1.verdict
        assert f"127.0.0.1:{port}" in rank1.verdict
    finally:
        rank1.stop()


def test_finished_rank_says_goodbye(server, tmp_path):
    store, port = server
    register(store, 0), register(store, 1, host="other-node")
    rank0, rank1 = ranks(port, tmp_path)
    rank1.start()
    rank1.stop()
    assert store.check(["dstrain/0/hb/done/1"])  # so its exit is not taken for a death
    rank0.stop()


def test_zombie_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped
        time.sleep(0.05)
    assert not heartbeat.process_alive(child.pid)
    child.wait()
    assert not heartbeat.process_alive(child.pid)
    assert heartbeat.process_alive(os.getpid())


def test_collective_timeout_with_every_rank_alive_names_the_knob(server, tmp_path, monkeypatch):
    from dstrain.config.run import DistributedConfig
    from dstrain.distributed import failures

    store, port = server
    register(store, 0), register(store, 1, host="other-node")
    rank0, rank1 = ranks(port, tmp_path)
    rank0.start(), rank1.start()
    monkeypatch.setattr(heartbeat, "_current", rank0)
    previous = signal.getsignal(signal.SIGTERM)
    gloo = RuntimeError(
        "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation"
    )
    try:
        error = failures.diagnose(gloo, DistributedConfig(collective_timeout_s=5))
    finally:
        signal.signal(signal.SIGTERM, previous)
        rank0.stop(), rank1.stop()
    assert error is not None
    message = str(error)
    assert "waited longer than distributed.collective_timeout_s (5 s) although every rank is alive" in message
    assert f"127.0.0.1:{port}" in message and "RuntimeError: Timed out waiting 5000ms" in message
    assert failures.diagnose(ValueError("a bug, not a collective"), DistributedConfig()) is None


def test_collective_timeout_without_the_heartbeat_is_one_message(monkeypatch):
    from dstrain.config.run import DistributedConfig
    from dstrain.distributed import failures

    monkeypatch.setattr(failures, "in_multi_rank_group", lambda: True)  # a 2-rank job, heartbeat_timeout_s: 0
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    previous = signal.getsignal(signal.SIGTERM)
    gloo = RuntimeError(
        "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation"
    )
    try:
        error = failures.diagnose(gloo, DistributedConfig(collective_timeout_s=5, heartbeat_timeout_s=0))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert error is not None
    message = str(error)
    assert (
        "waited longer than distributed.collective_timeout_s (5 s) (process group at 10.0.0.7:29500)"
        in message
    )
    assert "heartbeat_timeout_s is 0, so no rank was watched" in message
