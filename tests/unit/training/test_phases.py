"""Where a stop request takes effect before training (dstrain.training.phases), and the launcher's status
after one (dstrain.distributed.launcher); no process group, so every agreement is this process's own."""

from __future__ import annotations

import signal

import pytest

from dstrain.distributed.launcher import exit_status
from dstrain.distributed.stop import EvalInterrupted, StopRequest, StopRequested, interruptible
from dstrain.training.phases import halt_if_requested, phase, stop_agreed


def requested(signum: int | None) -> StopRequest:
    stop = StopRequest()
    stop.signal = signum
    return stop


def test_a_phase_without_a_stop_runs_through():
    stop = requested(None)
    with phase(stop, "the model and engine build"):
        done = True
    assert done and stop.phase == "the model and engine build"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_a_phase_takes_effect_at_its_end(signum, code):
    stop, ran = requested(None), []
    with pytest.raises(StopRequested) as info, phase(stop, "the model and engine build"):
        stop.signal, stop.arrived_in = signum, stop.phase  # as the handler sets them
        ran.append("rest of the phase")
    assert ran == ["rest of the phase"]
    assert info.value.exit_code == code and info.value.phase == "the model and engine build"
    name = signal.Signals(signum).name
    assert str(info.value) == (
        f"stopped by {name} during the model and engine build: nothing was trained, no checkpoint was written"
    )


def test_before_the_process_group_a_stop_waits_for_the_next_phase_that_all_ranks_check():
    """A rank that stopped alone while indexing would leave a peer that got no signal waiting out the
    rendezvous timeout: the stop is carried to the rendezvous' end and named after where it arrived."""
    stop = requested(None)
    with phase(stop, "the config checks and the data index", collective=False):
        stop.signal, stop.arrived_in = signal.SIGINT, stop.phase
    with (
        pytest.raises(StopRequested, match="during the config checks and the data index"),
        phase(stop, "the rendezvous"),
    ):
        pass


def test_a_failure_caused_by_the_stop_is_reported_as_the_stop():
    """Ctrl-C reaches the compilers of DeepSpeed's op build too; their failure is the stop, not a crash."""
    stop = requested(signal.SIGINT)
    with pytest.raises(StopRequested) as info, phase(stop, "the model and engine build"):
        raise RuntimeError("Error building extension 'cpu_adam'")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_failure_without_a_stop_stays_a_failure():
    with pytest.raises(RuntimeError, match="broken"), phase(requested(None), "the rendezvous"):
        raise RuntimeError("broken")


def test_halt_and_agreement_in_one_process():
    assert not stop_agreed(requested(None)) and stop_agreed(requested(signal.SIGTERM))
    halt_if_requested(requested(None), "the step-0 eval")
    with pytest.raises(StopRequested, match="during the step-0 eval"):
        halt_if_requested(requested(signal.SIGTERM), "the step-0 eval")


def test_an_eval_is_cut_short_at_the_next_batch():
    stop, seen = requested(None), []
    with pytest.raises(EvalInterrupted):
        for batch in interruptible(range(10), lambda: stop.requested):
            seen.append(batch)
            if batch == 3:
                stop.signal = signal.SIGINT
    assert seen == [0, 1, 2, 3]
    assert list(interruptible(range(3), None)) == [0, 1, 2]


def test_the_launchers_status_after_a_stop():
    assert exit_status(0, [signal.SIGTERM]) == 0  # the ranks saved and the launcher ended cleanly
    assert exit_status(1, [signal.SIGINT]) == 130  # DeepSpeed's launcher reports 1 whenever signalled
    assert exit_status(-2, [signal.SIGINT]) == 130
    assert exit_status(3, []) == 3
