"""Run `python -m dstrain.train` with NaN injected into the loss of chosen optimizer steps.

    python tests/integration/nan_probe.py STEPS ACCUMULATION -- --config RUN.yaml
STEPS is a comma-separated list of 1-based optimizer steps whose micro-batch losses become NaN (the
boundary where a real overflow would surface: the objective's output).
"""

from __future__ import annotations

import sys

import torch

import dstrain.training.loop as loop
from dstrain.train import main


def inject(steps: set[int], accumulation_hint: list[int]) -> None:
    real = loop.micro_loss  # the objective's output, whichever normalisation the run uses
    calls = {"n": 0}

    def poisoned(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, logged, router = real(*args, **kwargs)
        step = calls["n"] // accumulation_hint[0] + 1
        calls["n"] += 1
        if step in steps:
            return loss * float("nan"), logged * float("nan"), router
        return loss, logged, router

    loop.micro_loss = poisoned


if __name__ == "__main__":
    split = sys.argv.index("--")
    steps = {int(s) for s in sys.argv[1].split(",") if s}
    accumulation = [int(sys.argv[2])]
    inject(steps, accumulation)
    sys.exit(main(sys.argv[split + 1 :]))
