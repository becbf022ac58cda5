"""Two imports that deepspeed makes on every rank for features dstrain never uses, refused to it alone.

- `deepspeed.autotuning.autotuner` imports `mlflow` when `import deepspeed` runs, to log autotuning runs
  (dstrain never autotunes). Where mlflow is installed, that cost every rank and every `dstrain` command
  1.7 s of CPU.
- `DeepSpeedEngine` imports the Muon optimizer when ZeRO checks the client optimizer, only to add Muon to
  its list of ZeRO-ready optimizers. That module compiles its kernels with `torch.compile` at import, which
  loads torch's inductor: 2.5 s on every rank of every ZeRO run. dstrain's optimizers (torch's AdamW,
  DeepSpeed's FusedAdam and CPUAdam) are on that list already.

Measured in BENCHMARKS.md, "Start-up" (bench/import_bench.py). Both importers catch the ImportError and go
on without the feature; the refusal looks only at who asks, so dstrain's MLflow sink, or a user's own code,
imports either as usual. `DSTRAIN_ALLOW_UNUSED_IMPORTS=1` turns it off (for that benchmark, or should a
later deepspeed need either module).
"""

from __future__ import annotations

import importlib.abc
import os
import sys

# module refused -> the only module it is refused to
REFUSED = {
    "mlflow": "deepspeed.autotuning.autotuner",
    "deepspeed.runtime.zero.muon.muon_optimizer": "deepspeed.runtime.zero.utils",
}


class RefuseUnusedImports(importlib.abc.MetaPathFinder):
    """A meta-path finder that raises ImportError for `REFUSED[name]`'s import of `name` only."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        importer = REFUSED.get(name)
        if importer is None:
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") == importer:
                raise ImportError(f"dstrain: {name} is not loaded for {importer} (dstrain does not use it)")
            frame = frame.f_back
        return None


def install() -> None:
    """Put the finder first on `sys.meta_path`, once per process (unless DSTRAIN_ALLOW_UNUSED_IMPORTS=1)."""
    if os.environ.get("DSTRAIN_ALLOW_UNUSED_IMPORTS") == "1":
        return
    if not any(isinstance(finder, RefuseUnusedImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, RefuseUnusedImports())
