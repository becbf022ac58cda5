"""Weights & Biases is optional: used when configured and installed, a clear preflight error otherwise.

W&B is an external service, so the test puts a stand-in `wandb` module on the path that records the calls
dstrain makes (init, log, finish) to a JSON file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.helpers import REPO, check, child_env, make_small_data, metrics, run, write_config

FAKE_WANDB = """
import json, os
CALLS = []
def _dump():
    with open(os.environ["FAKE_WANDB_LOG"], "w") as fh:
        json.dump(CALLS, fh)
class _Run:
    def log(self, row, step=None):
        CALLS.append({"call": "log", "row": row, "step": step}); _dump()
    def finish(self):
        CALLS.append({"call": "finish"}); _dump()
def init(**kwargs):
    CALLS.append({"call": "init", "project": kwargs["project"], "resume": kwargs.get("resume"),
                  "has_config": bool(kwargs.get("config"))})
    _dump()
    return _Run()
"""


def test_wandb_receives_every_metrics_row(tmp_path: Path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    cfg = write_config(
        tmp_path, make_small_data(tmp_path), train={"max_steps": 3, "log_every": 1, "wandb_project": "rag-ft"}
    )
    env = {
        **child_env(),
        "PYTHONPATH": f"{fake}{os.pathsep}{REPO}",
        "FAKE_WANDB_LOG": str(tmp_path / "calls.json"),
    }
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "dstrain.train", "--config", str(cfg)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    check(proc)
    calls = json.loads((tmp_path / "calls.json").read_text())
    assert calls[0] == {"call": "init", "project": "rag-ft", "resume": "allow", "has_config": True}
    assert calls[-1] == {"call": "finish"}
    logged = [c for c in calls if c["call"] == "log" and "loss" in c["row"]]
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [c["step"] for c in logged] == [r["step"] for r in rows] == [1, 2, 3]
    assert [c["row"]["loss"] for c in logged] == [r["loss"] for r in rows]


def test_wandb_configured_but_missing_fails_before_training(tmp_path: Path):
    cfg = write_config(tmp_path, make_small_data(tmp_path), train={"max_steps": 2, "wandb_project": "x"})
    proc = run([sys.executable, "-m", "dstrain.train", "--config", str(cfg)], tmp_path)
    assert proc.returncode == 2
    assert "train.wandb_project is set but wandb is not installed: `pip install wandb`" in proc.stderr
    assert "Traceback" not in proc.stderr
