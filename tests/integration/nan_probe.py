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
    real = loop.sft_loss
    calls = {"n": 0}

    def poisoned(nll_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        loss = real(nll_sum, num_tokens)
        step = calls["n"] // accumulation_hint[0] + 1
        calls["n"] += 1
        return loss * float("nan") if step in steps else loss

    loop.sft_loss = poisoned


if __name__ == "__main__":
    split = sys.argv.index("--")
    steps = {int(s) for s in sys.argv[1].split(",") if s}
    accumulation = [int(sys.argv[2])]
    inject(steps, accumulation)
    sys.exit(main(sys.argv[split + 1 :]))
