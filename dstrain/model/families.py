"""What each causal-LM family does around its output head, and which log-prob path a run takes.

Most causal LMs compute `logits = lm_head(final_hidden)`. Some transform around the head: MiniCPM scales
the hidden states down first, Granite divides the logits, Cohere multiplies them, Gemma-2/3 soft-cap them.
Training through the bare head would train those models against the wrong logits, so each family dstrain
knows is one `LogitTransform` read from its config, applied inside the chunked head (head.py).

A family dstrain does not know (a remote-code model, a family newer than this table) takes the exact path:
the model's own forward, its head restricted to the supervised columns (exact.py). Whichever path a run
takes, `SupervisedLM` checks it against the model's own forward on the first batch (selfcheck.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap(logit_scale * head(hidden * hidden_scale)), softcap(x) = cap * tanh(x / cap)."""

    hidden_scale: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    def describe(self) -> str:
        parts = []
        if self.hidden_scale != 1.0:
            parts.append(f"hidden states x {self.hidden_scale:g} before the head")
        if self.logit_scale != 1.0:
            parts.append(f"logits x {self.logit_scale:g}")
        if self.softcap is not None:
            parts.append(f"soft-capped at {self.softcap:g}")
        return ", ".join(parts) or "plain head"


PLAIN = LogitTransform()


def _plain(config: Any) -> LogitTransform:
    return PLAIN


def _softcapped(config: Any) -> LogitTransform:
    return LogitTransform(softcap=getattr(config, "final_logit_softcapping", None) or None)


def _minicpm3(config: Any) -> LogitTransform:
    # MiniCPM3ForCausalLM: hidden_states / config.logits_scaling, a property = hidden_size / dim_model_base
    return LogitTransform(hidden_scale=1.0 / config.logits_scaling)


def _minicpm(config: Any) -> LogitTransform:
    # MiniCPM-1/2 (remote code): lm_head(hidden_states / (hidden_size / dim_model_base))
    return LogitTransform(hidden_scale=config.dim_model_base / config.hidden_size)


def _granite(config: Any) -> LogitTransform:
    return LogitTransform(logit_scale=1.0 / config.logits_scaling)


def _cohere(config: Any) -> LogitTransform:
    return LogitTransform(logit_scale=config.logit_scale)


# model_type -> reader. Each entry is checked against the family's transformers forward by the
# model-family matrix (tests/integration/test_model_families.py); add a family there when adding it here.
FAMILIES: dict[str, Callable[[Any], LogitTransform]] = {
    "llama": _plain,
    "mistral": _plain,
    "qwen2": _plain,
    "qwen3": _plain,
    "qwen2_moe": _plain,
    "qwen3_moe": _plain,
    "mixtral": _plain,
    "phi3": _plain,
    "olmo2": _plain,
    "olmoe": _plain,
    "glm4": _plain,
    "deepseek_v2": _plain,
    "gemma": _plain,
    "gemma2": _softcapped,
    "gemma3_text": _softcapped,
    "minicpm3": _minicpm3,
    "minicpm": _minicpm,
    "granite": _granite,
    "granitemoe": _granite,
    "cohere": _cohere,
    "cohere2": _cohere,
}

HeadKind = Literal["chunked", "exact"]


@dataclass(frozen=True)
class HeadPath:
    """How a run computes log-probs, and why (said once at start-up)."""

    kind: HeadKind
    transform: LogitTransform
    reason: str

    def describe(self) -> str:
        return f"log-probs: {self.kind} head ({self.reason})"


def choose_path(base: nn.Module, wanted: Literal["auto", "chunked", "exact"]) -> HeadPath:
    """The path for `base`: `model.head` as configured, with `auto` taking the chunked head where known."""
    config = base.config
    model_type = getattr(config, "model_type", "?")
    name = type(base).__name__
    reader = FAMILIES.get(model_type)
    if wanted == "exact":
        return HeadPath("exact", PLAIN, "model.head=exact: the model's own forward at supervised columns")
    if reader is None and wanted == "auto":
        return HeadPath(
            "exact",
            PLAIN,
            f"{name} (model_type {model_type!r}) is not a family dstrain knows, so its own forward computes "
            "the logits at the supervised columns; model.head=chunked would use the bare head",
        )
    transform = reader(config) if reader else PLAIN
    why = f"{name}: {transform.describe()}" if reader else f"model.head=chunked: {name} taken as a plain head"
    return HeadPath("chunked", transform, why)
