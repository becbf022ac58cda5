"""A stop request before training, on 2 ranks, under the deepspeed launcher and under `dstrain train
--num-gpus 2`: every rank stops at the same point, nothing hangs, nothing is saved (dstrain.distributed.stop).
The probe (tests/integration/stop_probe) holds the ranks in the phase until the signal arrives."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from tests.helpers import REPO, deepspeed_cmd, write_config
from tests.stop_helpers import checkpoints, finish, leftovers, probed_env, start_probed, wait_held

pytestmark = [pytest.mark.distributed, pytest.mark.solo]


def test_sigterm_to_one_rank_during_the_build_stops_every_rank(tmp_path, small_data):
    """Only rank 1 is signalled (a scheduler or a user may reach one process): rank 0, done with its build,
    waits in the phase's agreement and stops with it instead of training on or hanging."""
    config = write_config(tmp_path, small_data, train={"max_steps": 4})
    held = tmp_path / "held"
    held.mkdir()
    env = probed_env("build", held, DSTRAIN_PROBE_RANKS="1")
    proc = start_probed(deepspeed_cmd("--module", "dstrain.train", "--config", str(config)), REPO, env)
    os.kill(wait_held(proc, held, rank=1), signal.SIGTERM)
    code, output = finish(proc)
    assert code != 0, output[-3000:]  # the launcher reports the ranks' 143 as a failure of its own
    assert "stopped by SIGTERM during the model and engine build: nothing was trained" in output
    assert "Traceback" not in output
    assert checkpoints(tmp_path / "run") == []
    assert not leftovers(str(config))


def test_ctrl_c_to_dstrain_train_num_gpus_during_the_step0_eval(tmp_path, small_data):
    """Ctrl-C in a terminal signals the whole foreground group: the CLI, the launcher and both ranks."""
    config = write_config(tmp_path, small_data, train={"max_steps": 4, "eval_every": 2})
    held = tmp_path / "held"
    held.mkdir()
    cmd = [sys.executable, "-m", "dstrain.cli", "train", "--config", str(config), "--num-gpus", "2"]
    proc = start_probed(cmd, REPO, probed_env("step0_eval", held))
    wait_held(proc, held, rank=0)
    wait_held(proc, held, rank=1)
    os.killpg(proc.pid, signal.SIGINT)
    code, output = finish(proc)
    assert code == 130, output[-3000:]
    assert "stopped by SIGINT during the step-0 eval: nothing was trained" in output
    assert checkpoints(tmp_path / "run") == []
    assert not leftovers(str(config))
