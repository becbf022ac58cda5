"""A full disk on 2 ranks (the deepspeed launcher, gloo), ENOSPC injected (tests/integration/disk_probe): at a
checkpoint, which rank 0 writes, and at the data index cache, which the ranks of a node share. The rank that
saw it says so in one `error:` line; the other rank names it; the job ends at once, not after a collective
timeout, with the earlier checkpoint intact.

What a second rank adds is that agreement: a metrics write meets the same one (`agreed`, as the save does),
and the resume after a full disk is the same on any number of ranks, so both are tested on one process
(tests/integration/test_disk_full.py, with a real tiny filesystem where one can be mounted).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.diskfull import LORA, TRAIN, assert_checkpoints, probe_env
from tests.helpers import deepspeed_cmd, run, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.solo]

# A hang guard, not a speed test: far below the 600 s collective timeout a peer would otherwise wait out.
BOUND_S = 300


def launch(tmp_path: Path, small_data: dict, **probe: str):
    config = write_config(tmp_path, small_data, lora=LORA, train=TRAIN)
    env = probe_env(single=False, **probe)
    started = time.monotonic()
    proc = run(deepspeed_cmd("--module", "dstrain.train", "--config", str(config)), tmp_path, env=env)
    assert time.monotonic() - started < BOUND_S
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    return proc


def error_lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def test_a_full_disk_at_a_checkpoint_ends_both_ranks_naming_rank_0(tmp_path: Path, small_data: dict):
    # the second checkpoint's adapter file (save_file: adapter, then optimizer, per checkpoint)
    proc = launch(tmp_path, small_data, DSTRAIN_DISKFULL_AT="checkpoint", DSTRAIN_DISKFULL_CALL="3")
    (own,) = error_lines(proc.stderr, "error: ")
    assert f"no space left on the device (ENOSPC) writing checkpoint {tmp_path / 'run'}" in own
    assert "step-00000002, is intact" in own
    (peer,) = error_lines(proc.stderr, "[rank 1] error: ")
    assert peer.startswith(f"[rank 1] error: saving checkpoint {tmp_path / 'run'}/checkpoints/step-00000004")
    assert "failed on rank 0 (its own message says why; its log: " in peer
    assert_checkpoints(tmp_path / "run", 2)


def test_a_full_index_cache_ends_both_ranks_before_they_meet(tmp_path: Path, small_data: dict):
    proc = launch(
        tmp_path, small_data, DSTRAIN_DISKFULL_AT="index", DSTRAIN_CACHE_DIR=str(tmp_path / "cache")
    )
    (own,) = error_lines(proc.stderr, "error: ")
    assert "(ENOSPC) writing the data index cache" in own and "DSTRAIN_CACHE_DIR" in own
    # rank 1 met the same full cache; the launcher may end it before it says so, never with another error
    assert all(
        "writing the data index cache" in line for line in error_lines(proc.stderr, "[rank 1] error: ")
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
