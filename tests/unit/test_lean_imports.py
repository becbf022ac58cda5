"""dstrain refuses deepspeed's imports of mlflow (autotuner) and Muon (ZeRO's optimizer list) to those two
deepspeed modules only: a user's own import of either still works, and DSTRAIN_ALLOW_UNUSED_IMPORTS=1 turns
the refusal off. The imports are checked in a fresh interpreter, as a rank starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dstrain import lean_imports
from tests.helpers import REPO

MUON = "deepspeed.runtime.zero.muon.muon_optimizer"

PROBE = f"""
import sys
import dstrain, deepspeed, torch
from deepspeed.runtime.zero import utils
utils.dist.get_rank = lambda: 1  # its only use here is whether to log; no process group in this probe
optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
assert utils.is_zero_supported_optimizer(optimizer)
print("mlflow" in sys.modules, "{MUON}" in sys.modules)
import mlflow
from {MUON} import MuonWithAuxAdam
print("user imports ok")
"""


def test_deepspeed_does_not_load_mlflow_or_muon_and_a_user_still_can():
    pytest.importorskip("mlflow")
    env = {k: v for k, v in os.environ.items() if k != "DSTRAIN_ALLOW_UNUSED_IMPORTS"} | {
        "OMP_NUM_THREADS": "1"
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-3:-1] == ["False False", "user imports ok"]


@pytest.mark.parametrize(("value", "installed"), [(None, True), ("1", False), ("0", True)])
def test_allow_unused_imports_turns_the_refusal_off(monkeypatch, value: str | None, installed: bool):
    others = [f for f in sys.meta_path if not isinstance(f, lean_imports.RefuseUnusedImports)]
    monkeypatch.setattr(sys, "meta_path", others)
    if value is None:
        monkeypatch.delenv("DSTRAIN_ALLOW_UNUSED_IMPORTS", raising=False)
    else:
        monkeypatch.setenv("DSTRAIN_ALLOW_UNUSED_IMPORTS", value)
    lean_imports.install()
    lean_imports.install()
    refusing = [f for f in sys.meta_path if isinstance(f, lean_imports.RefuseUnusedImports)]
    assert len(refusing) == (1 if installed else 0)
