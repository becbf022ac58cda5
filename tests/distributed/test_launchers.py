"""The same training under every documented launcher: torchrun, and `dstrain train --num-gpus` (which starts
the deepspeed launcher itself)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import VENV_BIN, check, child_env, metrics, run, train_ranks, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.solo]


def test_torchrun_two_ranks(tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 3, "save_every": 0})
    check(train_ranks(config, cwd=tmp_path))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "adapter_model.safetensors").is_file()


def test_dstrain_train_num_gpus_starts_the_deepspeed_launcher(tmp_path, small_data):
    """`.venv/bin/dstrain train --num-gpus 2` as the README writes it, with the environment NOT activated
    (its bin/ off PATH): the launcher is the one of the environment dstrain runs in, found without PATH."""
    config = write_config(tmp_path, small_data, train={"max_steps": 2, "save_every": 0})
    env = child_env()  # it puts the venv's bin first on PATH: take it off again
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    cmd = [str(VENV_BIN / "dstrain"), "train", "--config", str(config), "--num-gpus", "2"]
    proc = check(run(cmd, tmp_path, env=env))
    launched = re.search(
        r"launching: (\S+) -m deepspeed.launcher.runner --num_gpus 2 --master_port \d+ "
        r"--module dstrain.train",
        proc.stderr,
    )
    assert launched, proc.stderr[-3000:]
    assert Path(launched.group(1)).parent == VENV_BIN  # this environment's python, not one found on PATH
    state = (tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state


def test_sigterm_to_dstrain_train_num_gpus_stops_the_ranks_with_a_save(tmp_path, small_data):
    """SIGTERM to `dstrain train --num-gpus` (a scheduler stopping the job) must reach the ranks: the
    deepspeed runner itself would die of it and leave them training, orphaned."""
    config = write_config(tmp_path, small_data, train={"max_steps": 5000, "save_every": 0, "log_every": 1})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstrain.cli", "train", "--config", str(config), "--num-gpus", "2"],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file() or not any(
        r.get("step", 0) >= 3 for r in metrics(run_dir)
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "no step 3"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step" in out + err
    assert list((run_dir / "checkpoints").glob("step-*/manifest.json"))
    left = [p for p in psutil.process_iter(["cmdline"]) if str(config) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
