"""A stand-in for DeepSpeed's engine at dstrain's boundary (dstrain/engine.py), for unit tests without a
process group: the calls dstrain.engine makes (forward, backward, step at the accumulation boundary, lr,
grad norm, was_step_applied, train/eval), over a module and torch's SGD."""

from __future__ import annotations

import torch


class StandInEngine:
    device = torch.device("cpu")

    def __init__(self, module: torch.nn.Module, accumulation: int = 1, lr: float = 1e-2) -> None:
        self.module = module
        self.accumulation = accumulation
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=lr)
        self.micro_steps = 0
        self.optimizer_steps = 0
        self.applied = True  # what was_step_applied reports
        self.modes: list[bool] = []  # module.training at each forward

    def __call__(self, **inputs):
        self.modes.append(self.module.training)
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:  # DeepSpeed steps the optimizer only at the accumulation boundary
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.optimizer_steps += 1

    def get_lr(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def get_global_grad_norm(self) -> None:
        return None

    def was_step_applied(self) -> bool:
        return self.applied

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()
