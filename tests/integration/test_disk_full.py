"""A full disk on one process, at a checkpoint, at a metrics write and at the data index cache.

The checkpoint case runs on a real tiny filesystem (a tmpfs with room for one checkpoint, not two) where
one can be mounted, else with ENOSPC injected where safetensors writes (tests/integration/disk_probe, which
tests/distributed/test_disk_full_ranks.py uses on 2 ranks either way); the metrics and index cases inject
it. Each ends the run with one `error:` line (the path, the bytes needed, what is free, what to do), a
non-zero exit and no traceback; no partial checkpoint is left, the earlier ones verify, the start-up warning
that the checkpoints will not fit came first, and `dstrain resume` finishes once there is room.

Two runs go side by side (one core each on the 2-core CI machine), then their resumes.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dstrain.checkpoint import sizing
from dstrain.config.run import LoraConfig
from dstrain.model.build import add_lora, builtin_dir
from tests.diskfull import LORA, TRAIN, assert_checkpoints, grow, mountable_tmpfs, probe_env
from tests.helpers import (
    VENV_BIN,
    assert_clean_failure,
    check,
    dstrain,
    make_small_data,
    metrics,
    run_together,
    write_config,
)


def checkpoint_estimate() -> int:
    """The bytes of one checkpoint of the test config's run: builtin:tiny with LoRA r=8, on the meta device."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(builtin_dir("tiny")))
        model = add_lora(base, LoraConfig(**LORA))
    return sizing.checkpoint_bytes(sizing.trainable_shapes(model), 1)


def assert_trained_once(run_dir: Path, steps: int) -> None:
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, steps + 1))


def test_a_full_disk_at_a_checkpoint_a_metrics_write_and_the_index_cache(tmp_path: Path):
    runs = {"ckpt": tmp_path / "ckpt", "metrics": tmp_path / "metrics"}
    configs = {}
    for name, where in runs.items():
        where.mkdir()
        configs[name] = write_config(where, make_small_data(where), lora=LORA, train=TRAIN)
    with contextlib.ExitStack() as stack:
        # Room for the run files, metrics and one checkpoint, not two (pages of 4 KiB, a few files besides)
        size_kib = int(1.5 * checkpoint_estimate() / 1024) + 64
        disk = stack.enter_context(mountable_tmpfs(tmp_path / "ckpt" / "run", f"{size_kib}k"))
        # without a tmpfs: ENOSPC at the second checkpoint's adapter file (save_file: adapter, optimizer)
        ckpt_env = {} if disk else probe_env(DSTRAIN_DISKFULL_AT="checkpoint", DSTRAIN_DISKFULL_CALL="3")
        # the third metrics row (step 3, after the step-2 checkpoint) meets a full disk; 4 KiB reported free
        metrics_env = probe_env(
            DSTRAIN_DISKFULL_AT="metrics", DSTRAIN_DISKFULL_CALL="3", DSTRAIN_DISKFULL_FREE="4096"
        )
        train = {
            name: [sys.executable, "-m", "dstrain.train", "--config", str(c)] for name, c in configs.items()
        }
        failed = run_together(train, tmp_path, {"ckpt": ckpt_env, "metrics": metrics_env})

        ckpt_dir, metrics_dir = runs["ckpt"] / "run", runs["metrics"] / "run"
        assert_clean_failure(
            failed["ckpt"],
            f"no space left on the device (ENOSPC) writing checkpoint {ckpt_dir}/checkpoints/step-00000004",
            "is free on the filesystem of",
            "free space there, lower train.keep_last, or move output_dir",
            f"the last checkpoint, step-00000002, is intact: `dstrain resume {ckpt_dir}`",
        )
        assert_clean_failure(
            failed["metrics"],
            f"no space left on the device (ENOSPC) writing metrics {metrics_dir / 'metrics.jsonl'} (it needs",
            "4.0 KiB is free on the filesystem of",
            "step-00000002, is intact",
        )
        assert failed["ckpt"].returncode == failed["metrics"].returncode == 2
        if disk:  # the start-up check saw the tiny filesystem: 6 checkpoints (keep_last 5 + 1) do not fit
            warning = [
                line for line in failed["ckpt"].stdout.splitlines() if line.startswith("warning: output")
            ]
            assert len(warning) == 1 and "6 checkpoints of" in warning[0], failed["ckpt"].stdout[-3000:]
        assert "warning: output_dir" in failed["metrics"].stdout  # it saw the 4 KiB reported free
        assert_checkpoints(ckpt_dir, 2)
        assert_checkpoints(metrics_dir, 2)

        # Room is made for the checkpoint run; the metrics run is resumed with an empty index cache on a
        # full disk: that fails before anything trains, leaving its run dir as it was.
        if disk:
            grow(disk, "16m")
        dstrain_bin = str(VENV_BIN / "dstrain")
        index_env = probe_env(DSTRAIN_DISKFULL_AT="index", DSTRAIN_CACHE_DIR=str(tmp_path / "cache"))
        resumed = run_together(
            {name: [dstrain_bin, "resume", str(where / "run")] for name, where in runs.items()},
            tmp_path,
            {"metrics": index_env},
        )
        check(resumed["ckpt"])
        assert_checkpoints(ckpt_dir, 2, 4)
        assert_trained_once(ckpt_dir, 4)
    assert_clean_failure(
        resumed["metrics"], "(ENOSPC) writing the data index cache", "set DSTRAIN_CACHE_DIR to a directory on"
    )
    assert_checkpoints(metrics_dir, 2)

    check(dstrain("resume", str(metrics_dir), cwd=tmp_path))
    assert_checkpoints(metrics_dir, 2, 4)
    assert_trained_once(metrics_dir, 4)
