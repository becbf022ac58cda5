"""A NaN loss skips the update (counted in metrics and the checkpoint); N in a row stops the run clearly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import REPO, check, make_small_data, metrics, run, write_config

PROBE = REPO / "tests" / "integration" / "nan_probe.py"
ACCUMULATION = 2  # global batch 8 = micro 4 x accumulation 2 on one rank


def probe(cfg: Path, steps: str, cwd: Path):
    return run([sys.executable, str(PROBE), steps, str(ACCUMULATION), "--", "--config", str(cfg)], cwd)


def config(tmp_path: Path, name: str, **train) -> Path:
    data = make_small_data(tmp_path)
    base = {"max_steps": 6, "log_every": 1, "save_every": 3, "global_batch_size": 8, "max_nonfinite_steps": 3}
    return write_config(tmp_path, data, name, train={**base, **train})


def test_nan_steps_are_skipped_and_counted(tmp_path: Path):
    """ZeRO-2 fp32: DeepSpeed sees the non-finite gradient norm and skips; the adapter stays finite."""
    check(probe(config(tmp_path, "clean"), "", tmp_path))
    proc = check(probe(config(tmp_path, "nan"), "2,5", tmp_path))
    assert "step 2: non-finite loss or gradient, update skipped" in proc.stdout
    rows = [r for r in metrics(tmp_path / "nan") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # A skipped step's loss is null (every micro batch was NaN), never NaN in the JSON; the others finite.
    assert [r["loss"] is None for r in rows] == [False, True, False, False, True, False]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["loss"] is not None)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1, 2, 2]
    state = json.loads(
        (tmp_path / "nan" / "checkpoints" / "step-00000006" / "trainer_state.json").read_text()
    )
    assert state["nonfinite_steps"] == 2
    adapter = load_file(str(tmp_path / "nan" / "checkpoints" / "step-00000006" / "adapter_model.safetensors"))
    clean = load_file(str(tmp_path / "clean" / "checkpoints" / "step-00000006" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(not torch.equal(adapter[k], clean[k]) for k in clean)  # two updates were really skipped
    # Step 1 ran identically in both runs: the skip did not touch what came before it.
    assert rows[0]["loss"] == next(r for r in metrics(tmp_path / "clean") if "loss" in r)["loss"]


def test_nan_in_a_row_stops_with_a_message(tmp_path: Path):
    proc = probe(config(tmp_path, "stuck"), "2,3,4", tmp_path)
    assert proc.returncode == 2
    assert "3 optimizer steps in a row had a NaN/inf loss" in proc.stderr
    assert "train.max_nonfinite_steps=3" in proc.stderr and "Traceback" not in proc.stderr


def test_nan_update_that_deepspeed_applies_stops_at_once(tmp_path: Path):
    """DeepSpeed skips non-finite updates only when it computes the gradient norm. Without it (no clipping,
    compute_grad_norm=false) the NaN reaches the weights: dstrain stops instead of training on them."""
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["gradient_clipping"] = 0.0
    ds["zero_optimization"]["compute_grad_norm"] = False
    (tmp_path / "no_norm.json").write_text(json.dumps(ds))
    cfg = config(tmp_path, "applied", max_nonfinite_steps=5)
    cfg.write_text(cfg.read_text().replace("ds_configs/zero2.json", str(tmp_path / "no_norm.json")))
    proc = probe(cfg, "2", tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "step 2: the loss was NaN/inf and the optimizer applied the update" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "applied" / "checkpoints" / "step-00000003").exists()  # nothing corrupt was saved
