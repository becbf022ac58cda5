"""Two imports that deepspeed makes on every rank for features dstrain never uses, kept from it alone.

- `deepspeed.autotuning.autotuner` imports `mlflow` when `import deepspeed` runs, to log autotuning runs
  (dstrain never autotunes). Where mlflow is installed, that cost every rank and every `dstrain` command
  1.7 s of CPU. Refused: the autotuner catches the ImportError and goes on without MLflow.
- ZeRO imports the Muon optimizer on every run, only to ask whether the client optimizer is one
  (`isinstance(optimizer, MuonWithAuxAdam)` in ZeRO-1/2's gradient reduction, ZeRO-3's and the bf16
  optimizer's set-up, the ZeRO-ready list). That module compiles its kernels with `torch.compile` at
  import, which loads torch's inductor: about 4 s of CPU on every rank here. dstrain trains with Adam (its
  checkpoints hold Adam's moments; a ZeRO JSON naming another optimizer is refused at load), so those
  modules get stand-ins (`MuonStandIn`): a `MuonWithAuxAdam` no optimizer is an instance of, a
  `muon_update` only Muon's parameters would reach. Used, either says how to get the real ones.

Measured in BENCHMARKS.md, "Start-up" (bench/import_bench.py). The finder looks only at who asks, so
dstrain's MLflow sink, or a user's own code, imports either as usual (Muon: unless ZeRO asked first in that
process). `DSTRAIN_ALLOW_UNUSED_IMPORTS=1` turns it off (for that benchmark, or should a later deepspeed
need either module).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

# module refused -> the only module it is refused to
REFUSED = {"mlflow": "deepspeed.autotuning.autotuner"}
MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
MUON_KERNELS = "deepspeed.runtime.zero.muon.original_muon"  # muon_update, compiled at import
# the deepspeed modules that import MUON (and MUON_KERNELS) only to ask whether the optimizer is Muon
MUON_ASKERS = frozenset(
    {
        "deepspeed.runtime.zero.utils",
        "deepspeed.runtime.zero.stage_1_and_2",
        "deepspeed.runtime.zero.stage3",
        "deepspeed.runtime.bf16_optimizer",
    }
)


class RefuseUnusedImports(importlib.abc.MetaPathFinder):
    """A meta-path finder that refuses `REFUSED[name]`'s import of `name`, and answers ZeRO's import of
    Muon with `MuonStandIn`; every other import goes on as usual."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if name in REFUSED and asked_by({REFUSED[name]}):
            raise ImportError(f"dstrain: {name} is not loaded for {REFUSED[name]} (dstrain does not use it)")
        if name in (MUON, MUON_KERNELS) and asked_by(MUON_ASKERS):
            return importlib.util.spec_from_loader(name, MuonStandIn())
        return None


def asked_by(importers: set[str] | frozenset[str]) -> bool:
    """Whether one of `importers` is on the stack of the import being resolved."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") in importers:
            return True
        frame = frame.f_back
    return False


class MuonStandIn(importlib.abc.Loader):
    """Deepspeed's two Muon modules without their compiled kernels: a `MuonWithAuxAdam` class no dstrain
    optimizer is an instance of, and a `muon_update` ZeRO only calls for Muon's parameters; either, used,
    says how to get the real module."""

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        refusal = (
            f"{module.__name__} is dstrain's stand-in in this process (dstrain trains with Adam): set "
            "DSTRAIN_ALLOW_UNUSED_IMPORTS=1 to load deepspeed's Muon optimizer"
        )

        class MuonWithAuxAdam:
            def __init__(self, *args: object, **kwargs: object) -> None:
                raise ImportError(refusal)

        def muon_update(*args: object, **kwargs: object) -> None:
            raise ImportError(refusal)

        MuonWithAuxAdam.__module__ = muon_update.__module__ = module.__name__
        module.MuonWithAuxAdam = MuonWithAuxAdam  # type: ignore[attr-defined]
        module.muon_update = muon_update  # type: ignore[attr-defined]


def install() -> None:
    """Put the finder first on `sys.meta_path`, once per process (unless DSTRAIN_ALLOW_UNUSED_IMPORTS=1)."""
    if os.environ.get("DSTRAIN_ALLOW_UNUSED_IMPORTS") == "1":
        return
    if not any(isinstance(finder, RefuseUnusedImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, RefuseUnusedImports())
