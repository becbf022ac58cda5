"""dstrain refuses deepspeed's autotuner its import of mlflow, and answers ZeRO's imports of the Muon
optimizer with a stand-in: a user's own import of either still works (Muon: when the user asks first; after
ZeRO, building the stand-in says how to get the real one), and DSTRAIN_ALLOW_UNUSED_IMPORTS=1 turns both off.
The imports are checked in a fresh interpreter, as a rank starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dstrain import lean_imports
from tests.helpers import REPO

MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
KERNELS = "deepspeed.runtime.zero.muon.original_muon"  # the real Muon's torch.compile'd kernels
KERNEL = "torch._inductor.compile_fx"  # what those kernels' torch.compile loads

ZERO_ASKS = f"""
import sys
import dstrain, deepspeed, torch
from deepspeed.runtime.zero import utils
utils.dist.get_rank = lambda: 1  # its only use here is whether to log; no process group in this probe
optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
assert utils.is_zero_supported_optimizer(optimizer)
from deepspeed.runtime.zero import stage_1_and_2
exec("from {MUON} import MuonWithAuxAdam; from {KERNELS} import muon_update", vars(stage_1_and_2))  # as ZeRO-2
assert not isinstance(optimizer, stage_1_and_2.MuonWithAuxAdam)
print("mlflow" in sys.modules, "{KERNEL}" in sys.modules)
MuonWithAuxAdam = stage_1_and_2.MuonWithAuxAdam
import mlflow
try:
    MuonWithAuxAdam([])
except ImportError as exc:
    print(exc)
"""

USER_ASKS_FIRST = f"""
import sys
import dstrain, deepspeed
from {MUON} import MuonWithAuxAdam
print("{KERNELS}" in sys.modules)
"""


def probe(code: str, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "DSTRAIN_ALLOW_UNUSED_IMPORTS"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=base | {"OMP_NUM_THREADS": "1"} | env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()


def test_deepspeed_does_not_load_mlflow_or_muons_kernels_and_a_user_still_can():
    pytest.importorskip("mlflow")
    *_, loaded, said = probe(ZERO_ASKS)
    assert loaded == "False False"
    assert said.startswith(f"{MUON} is dstrain's stand-in") and "DSTRAIN_ALLOW_UNUSED_IMPORTS=1" in said
    assert probe(USER_ASKS_FIRST)[-1] == "True"  # the real module, kernels and all


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
