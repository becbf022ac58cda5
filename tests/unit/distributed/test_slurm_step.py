"""`python -m dstrain.slurm`, the per-node step of the sbatch templates: what it reads from Slurm, when it
resumes, and how it watches the node's ranks. (The templates on a real Slurm: tests/slurm/.)"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from dstrain import slurm
from dstrain.errors import DstrainError
from tests.helpers import make_small_data, write_config

JOB = {
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_JOB_ID": "41234",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "SLURM_GPUS_ON_NODE": "4",
}


@pytest.fixture
def nodelist(monkeypatch):
    monkeypatch.setattr(slurm, "expand_nodelist", lambda text: {"gpu-[07-08]": ["gpu-07", "gpu-08"]}[text])


def test_plan_comes_from_slurm(nodelist):
    plan = slurm.plan_node(JOB)
    assert (plan.nodes, plan.node_rank, plan.nproc) == (2, 1, 4)
    assert plan.master_addr == "gpu-07"  # the job's first node
    assert plan.master_port == 20000 + 41234 % 20000
    env = slurm.rank_env(plan, 2, {})
    assert env == {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu-07",
                   "MASTER_PORT": str(plan.master_port)}  # fmt: skip


def test_master_can_be_chosen_and_ranks_given(nodelist):
    plan = slurm.plan_node({**JOB, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"}, nproc=2)
    assert (plan.master_addr, plan.master_port, plan.nproc) == ("10.0.0.1", 29555, 2)


def test_outside_slurm_says_so():
    with pytest.raises(DstrainError, match=r"SLURM_NTASKS is not set: .* runs inside a Slurm job step"):
        slurm.plan_node({})


def test_resumes_when_the_run_dir_has_a_checkpoint(tmp_path):
    config = write_config(tmp_path, make_small_data(tmp_path))
    sets = ["train.max_steps=9", "lora.r=4"]
    assert slurm.train_args(str(config), sets) == [
        "--config",
        str(config),
        "--set",
        sets[0],
        "--set",
        sets[1],
    ]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000002\n")
    # on resume the structural key is fixed by the checkpoint: only the mutable one is passed on
    assert slurm.train_args(str(config), sets) == ["--resume", str(tmp_path / "run"), "--set", sets[0]]


def test_a_failed_rank_stops_the_others_and_sets_the_exit_code(capfd, nodelist):
    plan = slurm.plan_node({**JOB, "SLURM_PROCID": "0"}, nproc=2)
    procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]),
        subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]),
    ]
    assert slurm.supervise(plan, procs, received=[]) == 3
    assert procs[0].returncode == -15  # terminated, not left running
    assert "rank 1 ended with exit code 3; stopping this node's ranks" in capfd.readouterr().err


def test_ranks_that_stop_before_training_are_a_clean_stop_not_a_failure(capfd, nodelist):
    """After a forwarded SIGTERM, ranks that exit 143 (stopped during start-up, nothing trained) do not make
    the node terminate the others; their status is what main() turns into a requeue."""
    plan = slurm.plan_node({**JOB, "SLURM_PROCID": "0"}, nproc=2)
    slow = "import time; time.sleep(1.5); raise SystemExit(143)"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for code in (slow, "raise SystemExit(143)")]
    assert slurm.supervise(plan, procs, received=[signal.SIGTERM]) == 143
    assert procs[0].returncode == 143  # left to finish its own stop, not terminated
    assert "stopping this node's ranks" not in capfd.readouterr().err
    assert slurm.stopped_before_training(143, [signal.SIGTERM])
    assert not slurm.stopped_before_training(143, []) and not slurm.stopped_before_training(
        1, [signal.SIGTERM]
    )
