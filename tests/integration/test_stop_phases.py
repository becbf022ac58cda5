"""A stop request is honoured in every phase of one local `dstrain train` process (dstrain.distributed.stop).

Each run is held in its phase by the probe (tests/integration/stop_probe), signalled there, and then:
before the first optimizer step it exits 128 + the signal with one line naming the phase and writes no
checkpoint; during an eval or a save it finishes the step (the save), saves, and exits 0; a second Ctrl-C
stops at once. No process outlives the run, and every checkpoint left passes `dstrain inspect`.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from dstrain.distributed.stop import ECHO_S
from tests.helpers import REPO, asset, check, dstrain, train_single, write_config
from tests.stop_helpers import checkpoints, finish, leftovers, probed_env, start_probed, wait_held

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def train_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "dstrain.cli", "train", "--config", str(config)]


def stop_in(
    phase: str, config: Path, tmp_path: Path, signum: int, cmd: list[str] | None = None, **probe: str
):
    """Run held in `phase`, signal it there; (exit status, output)."""
    held = tmp_path / f"held-{phase}"
    held.mkdir()
    env = probed_env(phase, held, DSTRAIN_PROBE_SINGLE="1", **probe)
    proc = start_probed(cmd or train_cmd(config), REPO, env)
    pid = wait_held(proc, held)
    assert pid == proc.pid  # the process itself, not a launcher
    proc.send_signal(signum)
    code, output = finish(proc)
    assert not leftovers(str(config))
    return code, output


def assert_intact(run_dir: Path) -> None:
    """Every checkpoint left verifies against its manifest, and no temp dir of a cut save remains."""
    for name in checkpoints(run_dir):
        if name.startswith("step-"):
            check(dstrain("inspect", str(run_dir / "checkpoints" / name), cwd=REPO))
    assert not [n for n in checkpoints(run_dir) if n.startswith(".tmp")]


@pytest.mark.parametrize(
    ("phase", "signum", "where"),
    [
        ("index", signal.SIGINT, "the config checks and the data index"),
        ("step0_eval", signal.SIGTERM, "the step-0 eval"),
    ],
)
def test_a_stop_before_training_exits_with_the_signal_and_saves_nothing(
    tmp_path, small_data, phase, signum, where
):
    config = write_config(tmp_path, small_data, train={"max_steps": 4, "eval_every": 2})
    code, output = stop_in(phase, config, tmp_path, signum)
    name = signal.Signals(signum).name
    assert code == EXIT[signum], output[-3000:]
    assert f"stopped by {name} during {where}: nothing was trained, no checkpoint was written" in output
    assert "Traceback" not in output
    assert checkpoints(tmp_path / "run") == []


def test_a_stop_during_the_build_of_a_resumed_run_leaves_its_checkpoints_intact(tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 2, "save_every": 1})
    check(train_single(config, cwd=REPO))
    run_dir = tmp_path / "run"
    before = checkpoints(run_dir)
    resume = [sys.executable, "-m", "dstrain.cli", "resume", str(run_dir), "--set", "train.max_steps=4"]
    code, output = stop_in("build", config, tmp_path, signal.SIGTERM, cmd=resume)
    assert code == 143, output[-3000:]
    assert "stopped by SIGTERM during the model and engine build" in output
    assert checkpoints(run_dir) == before == ["latest", "step-00000001", "step-00000002"]
    assert_intact(run_dir)


def test_a_stop_during_the_reference_pass_exits_before_training(tmp_path):
    data = {"train": asset("data", "preference_train.jsonl"), "eval": asset("data", "preference_eval.jsonl")}
    config = write_config(
        tmp_path,
        data,
        data={"format": "preference", "eval": []},
        objective={"name": "dpo", "precompute_reference": True},
        train={"max_steps": 3},
    )
    code, output = stop_in("reference", config, tmp_path, signal.SIGINT)
    assert code == 130, output[-3000:]
    assert "stopped by SIGINT during the reference log-prob pass" in output
    assert checkpoints(tmp_path / "run") == []


def test_a_stop_during_an_eval_cuts_it_short_saves_and_exits_zero(tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 6, "eval_every": 2, "save_every": 1})
    # evaluate_sets' first call is the step-0 eval, its second the one at step 2
    code, output = stop_in("eval", config, tmp_path, signal.SIGTERM, DSTRAIN_PROBE_CALL="2")
    assert code == 0, output[-3000:]
    assert "stopped at step 2; continue with `dstrain resume" in output
    run_dir = tmp_path / "run"
    assert checkpoints(run_dir) == ["latest", "step-00000001", "step-00000002"]
    assert_intact(run_dir)


def test_a_stop_during_a_save_finishes_it_then_exits_zero(tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 6, "save_every": 1})
    code, output = stop_in("save", config, tmp_path, signal.SIGINT, DSTRAIN_PROBE_CALL="2")
    assert code == 0, output[-3000:]
    assert "stopped at step 2" in output
    run_dir = tmp_path / "run"
    assert checkpoints(run_dir) == ["latest", "step-00000001", "step-00000002"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert_intact(run_dir)


def test_a_second_ctrl_c_stops_at_once_without_a_save(tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 4})
    held = tmp_path / "held"
    held.mkdir()
    env = probed_env("build", held, DSTRAIN_PROBE_SINGLE="1", DSTRAIN_PROBE_UNTIL="never")
    proc = start_probed(train_cmd(config), REPO, env)
    wait_held(proc, held)
    proc.send_signal(signal.SIGINT)
    time.sleep(ECHO_S + 0.5)  # a second signal within ECHO_S is the first one echoed (by design)
    proc.send_signal(signal.SIGINT)
    code, output = finish(proc)
    assert code == 130, output[-3000:]
    assert "interrupted again: stopped at once without saving; the last checkpoint is intact" in output
    assert checkpoints(tmp_path / "run") == []
    assert not leftovers(str(config))
