"""StopRequest with real signals sent to this process: a flag on the first, an echo ignored, a second that
means it raises KeyboardInterrupt, and the previous handlers back after uninstall."""

from __future__ import annotations

import os
import signal

import pytest

from dstrain.distributed import stop
from dstrain.distributed.stop import SIGNALS, StopRequest, ignore_in_worker


@pytest.fixture
def stopper():
    """An installed StopRequest; uninstalled after the test whatever happens."""
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    installed = StopRequest().install()
    yield installed
    installed.uninstall()
    for sig, handler in previous.items():  # also after a test that uninstalled early
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_sets_the_flag_and_says_so(stopper, sig, capfd):
    assert not stopper.requested
    os.kill(os.getpid(), sig)  # CPython runs the handler before the next bytecode
    assert stopper.requested
    assert stopper.signal == sig
    name = signal.Signals(sig).name
    assert f"{name} received: stopping after this step" in capfd.readouterr().err


def test_an_echo_of_the_first_signal_is_ignored(stopper, capfd):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher forwarding the same Ctrl-C, within ECHO_S
    assert stopper.signal == signal.SIGINT
    assert capfd.readouterr().err.count("received") == 1


def test_a_second_signal_after_the_echo_window_stops_at_once(stopper, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(stop.time, "monotonic", lambda: now[0])
    os.kill(os.getpid(), signal.SIGTERM)
    now[0] += stop.ECHO_S + 0.1
    with pytest.raises(KeyboardInterrupt) as info:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopper.signal == signal.SIGTERM  # the first request stands
    assert info.value.exit_code == 143  # Slurm's second SIGTERM reads as a stop (143), not a failure


def test_uninstall_restores_the_previous_handlers(stopper):
    seen = []
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: seen.append(signum))
    own = StopRequest().install()
    assert all(signal.getsignal(sig) == own._handle for sig in SIGNALS)
    own.uninstall()
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM] and not own.requested
    own.uninstall()  # twice is harmless: nothing left to restore
    assert signal.getsignal(signal.SIGTERM) is not own._handle


def test_install_returns_the_request():
    stopper = StopRequest()
    try:
        assert stopper.install() is stopper
    finally:
        stopper.uninstall()


def test_ignore_in_worker_ignores_both_signals():
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        ignore_in_worker(0)
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the test process lives on
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
