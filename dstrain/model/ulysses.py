"""Ulysses attention for transformers models: the sequence is split over a sequence-parallel group, and
each attention call swaps to splitting the heads instead, so every rank attends the whole sequence.

Layout: every rank of a group of N holds a contiguous 1/N slice of the sequence (all heads). In each
attention call q/k/v [B, H, s, D] go through one all-to-all to [B, H/N, S, D] (the whole sequence, 1/N of
the heads), torch's SDPA runs with the FULL-sequence mask, and a second all-to-all brings [B, S, H/N, D]
back to [B, s, H, D]. Both exchanges are autograd functions whose backward is the same exchange on the
gradient (a dim-0 all_to_all_single is its own inverse).

Why not DeepSpeed's UlyssesSPAttentionHF: it drops every 4D attention mask (packed rows and shared-prompt
pairs would attend across documents and answers), fixes the batch size, and replaces "sdpa" for the whole
process, so nothing could run unsharded next to it (eval generation, the self-check).

Masks: "ulysses_sdpa" has no entry in transformers' mask interface, so create_causal_mask hands the
decoder's `attention_mask` through untouched if it is 4D and drops a 2D one. The caller passes the full
mask: None (causal; right padding), [B, 1, S, S] bool (packing, shared-prompt pairs), or a full [B, S]
padding mask as the extra decoder kwarg `sp_padding` (which reaches this function through **kwargs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F

NAME = "ulysses_sdpa"
PLAIN = "sdpa"  # what the model runs unsharded (generation) while sequence parallelism is on
_GROUP: Any = None  # the sequence-parallel group the attention exchanges over (one per process)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 (chunk j goes to rank j); backward: the same exchange on the grad."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # empty_like of a permuted view keeps its strides: the exchange needs rows
        out = torch.empty_like(x)
        tdist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        tdist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def seq_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[B, H, s, D] (this rank's tokens, all heads) -> [B, H/N, N*s, D] (all tokens, this rank's heads)."""
    n = tdist.get_world_size(group)
    b, h, s, d = x.shape
    x = x.reshape(b, n, h // n, s, d).transpose(0, 1)  # [N (destination), B, H/N, s, D]
    y = _AllToAll.apply(x, group)  # [N (source = sequence chunk), B, H/N, s, D]
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def heads_to_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[B, S, H/N, D] (all tokens, this rank's heads) -> [B, S/N, H, D] (this rank's tokens, all heads)."""
    n = tdist.get_world_size(group)
    b, big_s, h, d = x.shape
    x = x.reshape(b, n, big_s // n, h, d).transpose(0, 1)  # [N (destination = sequence chunk), B, s, H/N, D]
    y = _AllToAll.apply(x, group)  # [N (source = head chunk), B, s, H/N, D]
    return y.permute(1, 2, 0, 3, 4).reshape(b, big_s // n, n * h, d)


def full_mask(mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor | None:
    """The SDPA mask for the gathered sequence: None (causal via is_causal), or [B, 1, S, S] bool."""
    if mask is None:
        return None
    if mask.dim() == 4:
        return mask if mask.dtype == torch.bool else mask == 0  # an additive float mask: 0 = attend
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    keep = causal[None, None] & mask.bool()[:, None, None, :]
    # a query row with nothing to attend (left padding) would give NaN, which poisons the backward
    return keep | torch.eye(length, dtype=torch.bool, device=device)


def spread_kv(key: torch.Tensor, value: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA/MQA with fewer kv heads than ranks: replicate them so that each rank receives whole kv heads."""
    kv_heads = key.shape[1]
    if kv_heads % n == 0:
        return key, value
    if n % kv_heads:
        raise ValueError(f"{kv_heads} kv heads and sequence_parallel_size {n}: neither divides the other")
    return key.repeat_interleave(n // kv_heads, dim=1), value.repeat_interleave(n // kv_heads, dim=1)


def ulysses_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q/k/v [B, H, s, D] of this rank's slice -> [B, s, H, D]."""
    if kwargs.get("softcap") or kwargs.get("sliding_window"):  # install() refuses such models; never silent
        raise ValueError("the sequence-parallel attention computes neither soft-capping nor sliding windows")
    group = _GROUP
    n = tdist.get_world_size(group)
    if query.shape[1] % n:
        raise ValueError(f"{query.shape[1]} attention heads do not divide by sequence_parallel_size {n}")
    key, value = spread_kv(key, value, n)
    q, k, v = (seq_to_heads(t, group) for t in (query, key, value))
    if k.shape[1] != q.shape[1]:  # the local GQA groups: rank r's q heads use rank r's kv heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    padding = kwargs.get("sp_padding")
    mask = full_mask(attention_mask if attention_mask is not None else padding, q.shape[2], q.device)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
    )
    return heads_to_seq(out.transpose(1, 2), group), None


def unsupported(config: Any) -> str | None:
    """Why this attention cannot run a model (its text config) exactly, or None: it is plain causal SDPA, so
    attention-logit soft-capping (Gemma-2) and sliding-window layers would silently be computed without."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None):
        return "attention-logit soft-capping"
    layer_types = getattr(text, "layer_types", None) or []
    windowed = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    if "sliding_attention" in layer_types or (windowed and not layer_types):
        return "sliding-window attention"
    return None


def _set_attention(model: torch.nn.Module, name: str) -> None:
    model.config._attn_implementation = name
    for sub in model.modules():  # text sub-configs of composite models carry their own copy
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def install(model: torch.nn.Module, group: Any) -> None:
    """Register the attention and switch `model` (a transformers PreTrainedModel) to it."""
    global _GROUP
    from transformers import AttentionInterface

    from dstrain.errors import ConfigError

    if (why := unsupported(model.config)) is not None:
        raise ConfigError(
            [
                f"train.sequence_parallel_size: {type(model).__name__} uses {why}, which the sequence-parallel "
                "attention (plain causal SDPA) does not compute; train it with sequence_parallel_size 1"
            ]
        )
    _GROUP = group
    AttentionInterface.register(NAME, ulysses_sdpa)
    _set_attention(model, NAME)


@contextmanager
def plain_attention(model: torch.nn.Module) -> Iterator[None]:
    """Unsharded attention ("sdpa") for the block: whole sequences on one rank (generation, the self-check).
    A no-op for a model that does not run the Ulysses attention."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        yield
        return
    _set_attention(model, PLAIN)
    try:
        yield
    finally:
        _set_attention(model, NAME)
