"""The output head and log-softmax at supervised positions only, in chunks, without keeping the logits.

`target_logps(head, hidden, targets, chunk)` returns log p(target) for K positions. A frozen plain
`nn.Linear` head (every causal LM's lm_head under LoRA) goes through one autograd function that computes
the logits `chunk` positions at a time and keeps none of them for backward (except when all K fit in one
chunk: then that chunk's probabilities are kept, and nothing is recomputed); backward recomputes each
chunk's logits and returns the gradient of the hidden states. Peak logits memory is chunk x vocab, not
K x vocab, and never batch x seq x vocab.

Under ZeRO-3 the head's weight is partitioned. `SupervisedHead` is the module DeepSpeed sees: the head's
parameters are registered as its external parameters, so ZeRO-3 gathers them once when it runs and once
before its backward, the same on every rank whatever its K. (Calling the head module once per chunk would
make ranks with more supervised tokens gather more often, and hang; gathering by hand inside the wrapped
model's forward clashes with ZeRO-3's own bookkeeping.) A trainable or adapted head (LoRA on lm_head) is
called as a module, in one piece.

A family's `LogitTransform` (families.py) is applied inside each chunk: the hidden states are scaled before
the head, the logits scaled and soft-capped after it, in fp32, and backward multiplies by the transform's
derivative. Training, eval and the self-check all see the logits the model's own forward computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dstrain.model.families import PLAIN, LogitTransform


def chunkable(head: nn.Module) -> bool:
    """A plain, frozen linear head: what the chunked function computes by itself."""
    frozen = not any(p.requires_grad for p in head.parameters())
    return type(head) is nn.Linear and frozen


def _raw_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias).float()


def _transformed(raw: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """The family's logits from the head's raw fp32 output (scale, then soft-cap)."""
    out = raw * transform.logit_scale if transform.logit_scale != 1.0 else raw
    if transform.softcap is not None:
        out = torch.tanh(out / transform.softcap) * transform.softcap
    return out


def _derivative(raw: torch.Tensor, transform: LogitTransform) -> torch.Tensor | float:
    """d logits / d raw, elementwise: the scale, times 1 - tanh^2 under soft-capping."""
    if transform.softcap is None:
        return transform.logit_scale
    capped = torch.tanh(raw * (transform.logit_scale / transform.softcap))
    return (1.0 - capped.square_()).mul_(transform.logit_scale)


def _picked(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, targets[:, None])[:, 0]


class ChunkedTargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        head: nn.Linear,
        chunk: int,
        transform: LogitTransform = PLAIN,
    ) -> torch.Tensor:
        spans = list(zip(hidden.split(chunk), targets.split(chunk), strict=True))
        probs = None
        weight, bias = head.weight, head.bias
        with torch.no_grad():
            out = []
            for h, t in spans:
                logits = _transformed(_raw_logits(h, weight, bias), transform)
                lse = torch.logsumexp(logits, dim=-1)
                out.append(_picked(logits, t) - lse)
                # one chunk of a plain head: keep its probabilities, nothing is recomputed in backward
                if len(spans) == 1 and ctx.needs_input_grad[0] and transform.softcap is None:
                    probs = (logits - lse[:, None]).exp_()
                del logits
        ctx.save_for_backward(hidden, targets, *([probs] if probs is not None else []))
        ctx.head, ctx.chunk, ctx.transform = head, chunk, transform
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        hidden, targets, *kept = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        transform = ctx.transform
        # under ZeRO-3 gathered by SupervisedHead's pre-backward hook
        weight, bias = ctx.head.weight, ctx.head.bias
        for start in range(0, hidden.shape[0], ctx.chunk):
            span = slice(start, start + ctx.chunk)
            h, t, g = hidden[span], targets[span], grad_out[span]
            if kept:
                probs, derivative = kept[0], transform.logit_scale
            else:
                raw = _raw_logits(h, weight, bias)
                probs = torch.softmax(_transformed(raw, transform), dim=-1)
                derivative = _derivative(raw, transform)
                del raw
            # d log p(t) / d logits = onehot(t) - softmax; then through the transform to the head's output
            grad_logits = probs * -g[:, None]
            grad_logits.scatter_add_(1, t[:, None], g[:, None].float())
            if torch.is_tensor(derivative) or derivative != 1.0:
                grad_logits = grad_logits * derivative
            grad_hidden[span] = grad_logits.to(weight.dtype) @ weight
        return grad_hidden, None, None, None, None


def _target_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, transform: LogitTransform
) -> torch.Tensor:
    logits = _transformed(head(hidden).float(), transform)
    return -F.cross_entropy(logits, targets, reduction="none")


def target_logps(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    transform: LogitTransform = PLAIN,
) -> torch.Tensor:
    """log p(target) [K] in fp32 for K supervised positions, `chunk` positions at a time (0: all at once).

    `hidden` are the final hidden states; the family's transform is applied here, scaling included.
    """
    if transform.hidden_scale != 1.0:
        hidden = hidden * transform.hidden_scale
    if chunk > 0 and chunkable(head):
        return ChunkedTargetLogps.apply(hidden, targets, head, chunk, transform)
    return _target_logps(head, hidden, targets, transform)


class SupervisedHead(nn.Module):
    """`target_logps` as a module of its own, for ZeRO-3 (see the module docstring).

    The head is held outside the module tree (it already belongs to the model; registering it twice would
    give it two sets of ZeRO-3 hooks).
    """

    def __init__(self, head: nn.Module, chunk: int, transform: LogitTransform = PLAIN) -> None:
        super().__init__()
        self._head = (head,)
        self.chunk = chunk
        self.transform = transform
        if chunk > 0 and chunkable(head):
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            for param in head.parameters():  # only records them; a no-op outside ZeRO-3
                register_external_parameter(self, param)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return target_logps(self._head[0], hidden, targets, self.chunk, self.transform)
