"""The same training under every documented launcher: torchrun, and `dstrain train --num-gpus` (which starts
the deepspeed launcher itself)."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import VENV_BIN, check, free_port, metrics, run, write_config

pytestmark = pytest.mark.distributed


def test_torchrun_two_ranks(tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 3, "save_every": 0})
    cmd = [
        str(VENV_BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "dstrain.train",
        "--config",
        str(config),
    ]
    check(run(cmd, tmp_path))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "adapter_model.safetensors").is_file()


def test_dstrain_train_num_gpus_starts_the_deepspeed_launcher(tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 2, "save_every": 0})
    proc = check(
        run(
            [sys.executable, "-m", "dstrain.cli", "train", "--config", str(config), "--num-gpus", "2"],
            tmp_path,
        )
    )
    assert "launching: deepspeed --num_gpus 2 --module dstrain.train" in proc.stderr
    state = (tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state
