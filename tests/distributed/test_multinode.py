"""Two "nodes" on one machine, as a cluster runs them without ssh: one deepspeed launcher per node, each with
the same hostfile and its own `--node_rank`, meeting at rank 0's address. They train, save, resume, keep one
log per rank and a console only on rank 0; a node given the wrong port fails fast and says so."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import VENV_BIN, child_env, free_port, metrics, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.solo]


def write_hostfile(tmp_path: Path) -> Path:
    # --no_ssh: the names only index the hostfile (node_rank R runs the ranks of the R-th line)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    return hostfile


def node_cmd(hostfile: Path, node_rank: int, port: int, *args: str) -> list[str]:
    return [
        str(VENV_BIN / "deepspeed"),
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(node_rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "--module",
        "dstrain.train",
        *args,
    ]


def start_nodes(tmp_path: Path, args: list[str], ports: tuple[int, int]) -> list[subprocess.Popen]:
    hostfile = write_hostfile(tmp_path)
    return [
        subprocess.Popen(
            node_cmd(hostfile, rank, port, *args),
            cwd=tmp_path,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, port in enumerate(ports)
    ]


def finish(nodes: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    results = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
        results.append((node.returncode, out, err))
    return results


def run_two_nodes(tmp_path: Path, *args: str) -> list[tuple[int, str, str]]:
    port = free_port()
    results = finish(start_nodes(tmp_path, list(args), (port, port)))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"node {rank} exit {code}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-5000:]}"
    return results


def test_two_nodes_no_ssh_train_save_and_resume(tmp_path, small_data):
    config = write_config(tmp_path, small_data, train={"max_steps": 4, "save_every": 2})
    run_dir = tmp_path / "run"
    (_, out0, err0), (_, out1, err1) = run_two_nodes(tmp_path, "--config", str(config))

    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]
    # rank-0-only console: node 0 shows the run, node 1 shows none of it; rank 1 writes to its log
    assert "dstrain: builtin:tiny" in out0 + err0 and "4/4 loss" in out0 + err0
    assert "dstrain: builtin:tiny" not in out1 + err1 and " loss " not in out1 + err1
    assert "rank 1/2" in (run_dir / "logs" / "rank-00001.log").read_text()
    assert "dstrain: builtin:tiny" in (run_dir / "logs" / "rank-00000.log").read_text()

    (_, out0, err0), _ = run_two_nodes(tmp_path, "--resume", str(run_dir), "--set", "train.max_steps=6")
    assert "resuming from" in out0 + err0 and "at step 4" in out0 + err0
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "step-00000006" / "adapter_model.safetensors").is_file()
    # one header per attempt in each rank's log
    assert (run_dir / "logs" / "rank-00001.log").read_text().count("===== ") == 2


def test_wrong_master_port_fails_fast_on_both_nodes(tmp_path, small_data):
    config = write_config(tmp_path, small_data, distributed={"rendezvous_timeout_s": 15})
    right, wrong = free_port(), free_port()
    began = time.monotonic()
    (code0, _, err0), (code1, _, err1) = finish(
        start_nodes(tmp_path, ["--config", str(config)], (right, wrong)), timeout=240
    )
    assert time.monotonic() - began < 120  # hang guard, not a speed test: 15 s rendezvous timeout, not 600 s
    assert code0 != 0 and code1 != 0
    assert "missing: rank 1" in err0 and f"127.0.0.1:{right}" in err0, err0
    assert f"could not reach rank 0's rendezvous at 127.0.0.1:{wrong}" in err1, err1
    for err in (err0, err1):
        assert "Traceback" not in err and err.count("error:") == 1, err
