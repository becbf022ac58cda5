"""A full disk, on one process: a real one (a tmpfs too small for the second checkpoint) and one injected at
the library boundary (tests/integration/disk_probe) at a metrics write and at the data index cache.

Each ends the run with one `error:` line (the path, the bytes needed, what is free, what to do), a non-zero
exit and no traceback; no partial checkpoint is left, the earlier ones verify, and `dstrain resume` finishes
once there is room. The start-up warning that the checkpoints will not fit comes first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dstrain.checkpoint import sizing
from dstrain.config.run import LoraConfig
from dstrain.model.build import add_lora, builtin_dir
from tests.diskfull import LORA, TRAIN, assert_checkpoints, grow, probe_env, tmpfs
from tests.helpers import assert_clean_failure, check, dstrain, metrics, run, write_config


def train_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "dstrain.train", "--config", str(config)]


def assert_trained_once(run_dir: Path, steps: int) -> None:
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, steps + 1))


def checkpoint_estimate() -> int:
    """The bytes of one checkpoint of the test config's run: builtin:tiny with LoRA r=8, on the meta device."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(builtin_dir("tiny")))
        model = add_lora(base, LoraConfig(**LORA))
    return sizing.checkpoint_bytes(sizing.trainable_shapes(model), 1)


def test_a_checkpoint_that_does_not_fit_on_a_tiny_filesystem(tmp_path: Path, small_data: dict):
    # Room for the run files, metrics and one checkpoint, not two: pages of 4 KiB, a few files besides.
    size_kib = int(1.5 * checkpoint_estimate() / 1024) + 64
    disk = tmp_path / "disk"
    config = write_config(tmp_path, small_data, lora=LORA, train=TRAIN, output_dir=str(disk / "run"))
    with tmpfs(disk, f"{size_kib}k"):
        proc = run(train_cmd(config), tmp_path)
        assert_clean_failure(
            proc,
            f"no space left on the device (ENOSPC) writing checkpoint {disk / 'run' / 'checkpoints'}/step-00000004",
            "is free on the filesystem of",
            "free space there, lower train.keep_last, or move output_dir",
            f"the last checkpoint, step-00000002, is intact: `dstrain resume {disk / 'run'}`",
        )
        assert proc.returncode == 2
        warning = [line for line in proc.stdout.splitlines() if line.startswith("warning: output_dir")]
        assert len(warning) == 1 and "6 checkpoints of" in warning[0], proc.stdout[-3000:]
        assert_checkpoints(disk / "run", 2)
        grow(disk, "16m")  # the user makes room
        check(dstrain("resume", str(disk / "run"), cwd=tmp_path))
        assert_checkpoints(disk / "run", 2, 4)
        assert_trained_once(disk / "run", 4)


def test_a_full_disk_at_a_metrics_write_then_at_the_index_cache(tmp_path: Path, small_data: dict):
    config = write_config(tmp_path, small_data, lora=LORA, train=TRAIN)
    run_dir = tmp_path / "run"
    # the third metrics row (step 3, after the step-2 checkpoint) meets a full disk; 4 KiB reported free
    env = probe_env(DSTRAIN_DISKFULL_AT="metrics", DSTRAIN_DISKFULL_CALL="3", DSTRAIN_DISKFULL_FREE="4096")
    proc = run(train_cmd(config), tmp_path, env=env)
    assert_clean_failure(
        proc,
        f"no space left on the device (ENOSPC) writing metrics {run_dir / 'metrics.jsonl'} (it needs about",
        "4.0 KiB is free on the filesystem of",
        "step-00000002, is intact",
    )
    assert "warning: output_dir" in proc.stdout  # the start-up check saw the 4 KiB too
    assert_checkpoints(run_dir, 2)

    # Resumed with an empty index cache on a full disk: it fails before anything trains, the run dir as it was.
    env = probe_env(DSTRAIN_DISKFULL_AT="index", DSTRAIN_CACHE_DIR=str(tmp_path / "cache"))
    proc = run([str(Path(sys.executable).parent / "dstrain"), "resume", str(run_dir)], tmp_path, env=env)
    assert_clean_failure(
        proc, "(ENOSPC) writing the data index cache", "set DSTRAIN_CACHE_DIR to a directory on a filesystem"
    )
    assert_checkpoints(run_dir, 2)

    check(dstrain("resume", str(run_dir), cwd=tmp_path))
    assert_checkpoints(run_dir, 2, 4)
    assert_trained_once(run_dir, 4)
    assert json.loads((run_dir / "checkpoints/step-00000004/trainer_state.json").read_text())["step"] == 4
