"""Which attention each decoder layer runs, and the masks packed rows and shared-prompt pairs give each kind.

Packed rows (data/packing.py) and shared-prompt pairs (data/pairs.py) keep records apart with a 4-D bool
mask [B, 1, L, L]. transformers uses a 4-D mask as given, in every layer: a sliding-window layer handed the
block mask attends over the whole record, which it never does at inference. So each layer kind gets its own
mask here: full-attention layers the record mask, sliding-window layers the record mask intersected with the
window.

The window is measured in position ids, not row indices: key k is in the window of query q when
`pos[q] - pos[k] < window`, which on a record's own row (index = position) is transformers'
`kv_idx > q_idx - sliding_window`. A packed sample's positions restart at 0, so there the two agree. In a
shared-prompt row the rejected branch sits after the chosen one: its index distance to the prompt is longer
than in its own row by the chosen branch's length, while its position ids continue from the prompt exactly
as in its own row. So the window in position terms is what each answer token sees alone.

Eager attention adds the mask to the scores: it takes 0 / the dtype's minimum, as transformers' own
`eager_mask` builds it. A bool mask would add 1 and 0, i.e. mask nothing (sdpa takes bool as it is).

How a family reads its layer kinds from its config and how its decoder takes per-kind masks is one entry of
`FAMILIES`, checked against the family's own per-row forward by tests/unit/model/test_windows.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from dstrain.config.checks import PAIR_ROW_FORMATS
from dstrain.config.run import RunConfig
from dstrain.errors import ConfigError

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class LayerKinds:
    """A model's attention, as far as masks go: one kind per decoder layer, the sliding window, the handoff."""

    types: tuple[str, ...]
    window: int | None  # tokens a sliding layer sees, itself included
    mapping: bool  # the decoder takes {layer type: 4-D mask} (transformers' `causal_mask_mapping`)
    known: bool = True  # the family is in FAMILIES
    unexpressed: str | None = None  # attention no record layout expresses (bidirectional, chunked, ...)
    no_handoff: str | None = None  # sliding layers dstrain cannot hand their own 4-D mask

    @property
    def sliding(self) -> bool:
        return SLIDING in self.types

    @property
    def problem(self) -> str | None:
        """Why a 4-D record mask cannot give this model its own attention, or None."""
        return self.unexpressed or self.no_handoff


def _window(config: Any) -> int | None:
    # Qwen2/3 configs keep a sliding_window that only applies when use_sliding_window is on
    return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None


def _uniform(config: Any, known: bool = True) -> LayerKinds:
    """Every layer alike: sliding when the config sets a window (Mistral, Phi-3, Mixtral, Qwen3-MoE build one
    mask with create_sliding_window_causal_mask for all layers), the decoder taking one 4-D mask."""
    window = _window(config)
    kind = SLIDING if window else FULL
    return LayerKinds((kind,) * config.num_hidden_layers, window, mapping=False, known=known)


def _per_layer(config: Any) -> LayerKinds:
    """config.layer_types (derived by the config from sliding_window_pattern or max_window_layers), the
    decoder taking a mapping of masks per layer type."""
    return LayerKinds(tuple(config.layer_types), _window(config), mapping=True)


def _unknown(config: Any) -> LayerKinds:
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return _uniform(config, known=False)
    return LayerKinds(tuple(layer_types), _window(config), mapping=False, known=False)


# model_type -> reader, each checked against transformers 5's modeling code: the mapping families build
# `causal_mask_mapping` unless handed one; the uniform ones pass one mask to every layer.
FAMILIES: dict[str, Callable[[Any], LayerKinds]] = {
    "mistral": _uniform,
    "phi3": _uniform,
    "mixtral": _uniform,
    "qwen3_moe": _uniform,
    "gemma2": _per_layer,
    "gemma3_text": _per_layer,
    "cohere2": _per_layer,
    "qwen2": _per_layer,
    "qwen3": _per_layer,
}


def layer_kinds(config: Any) -> LayerKinds:
    """The layer kinds of a model from its config (the text config of a composite model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = FAMILIES.get(getattr(text, "model_type", ""), _unknown)(text)
    return replace(kinds, unexpressed=_unexpressed(text, kinds), no_handoff=_no_handoff(kinds))


def _unexpressed(config: Any, kinds: LayerKinds) -> str | None:
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if getattr(config, "attention_chunk_size", None):
        return "chunked attention (attention_chunk_size)"
    if other := sorted(set(kinds.types) - {FULL, SLIDING}):
        return f"{', '.join(other)} layers"
    return None


def _no_handoff(kinds: LayerKinds) -> str | None:
    if kinds.sliding and not isinstance(kinds.window, int):
        return f"sliding-window layers with sliding_window {kinds.window!r}"
    if kinds.sliding and not kinds.known:
        return "sliding-window layers in a family dstrain has no per-layer mask entry for (model/windows.py)"
    if kinds.sliding and FULL in kinds.types and not kinds.mapping:
        return "sliding-window and full-attention layers in a decoder that takes one mask for all layers"
    return None


FIX = "set data.packing=false and data.share_prompt=false (each record in its own padded row)"


def in_window(position_ids: torch.Tensor, window: int) -> torch.Tensor:
    """[B, 1, L, L] bool: key k is within query q's window, pos[q] - pos[k] < window (module docstring).

    Written as pos[k] > pos[q] - window so that the only [L, L] tensor made is the bool result (an int64
    distance matrix would be 8x the mask's memory).
    """
    return (position_ids[:, None, :] > position_ids[:, :, None] - window)[:, None]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as eager attention adds it to the scores: 0 where seen, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def layer_masks(
    kinds: LayerKinds, mask: torch.Tensor, position_ids: torch.Tensor, attention: str, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """What the decoder takes for a record mask [B, 1, L, L] bool with its position ids [B, L]: one 4-D mask
    when every layer needs the same, else {layer type: mask}; additive for eager `attention`."""
    if kinds.problem is not None:
        raise ConfigError(
            [f"data: this model uses {kinds.problem}, which dstrain's 4-D record masks cannot express; {FIX}"]
        )
    masks = {kind: mask for kind in dict.fromkeys(kinds.types)}
    if kinds.sliding:
        masks[SLIDING] = mask & in_window(position_ids, kinds.window)
    if attention == "eager":
        masks = {kind: additive(m, dtype) for kind, m in masks.items()}
    if len(masks) == 1:  # one mask for every layer: any decoder takes it as given
        return next(iter(masks.values()))
    return masks


def record_mask_key(cfg: RunConfig) -> str | None:
    """The config key whose layout hands the model a 4-D record mask, or None (padded rows, or a flat
    packed row under flash_attention_2, whose kernels apply each layer's window themselves)."""
    if cfg.data.packing and cfg.model.attn_implementation != "flash_attention_2":
        return "data.packing"
    if cfg.data.share_prompt and cfg.data.format in PAIR_ROW_FORMATS:
        return "data.share_prompt"
    return None


def mask_problems(cfg: RunConfig, config: Any) -> list[str]:
    """The run's record masks against the model's attention (its config), before anything is built."""
    kinds = layer_kinds(config)
    if (key := record_mask_key(cfg)) is not None and kinds.problem is not None:
        return [
            f"{key}: {cfg.model.path} uses {kinds.problem}, which dstrain's 4-D record masks cannot express "
            f"(it would train on other attention than the model's own); set {key}=false"
        ]
    if cfg.data.packing and kinds.unexpressed is not None:  # the flat row: flash applies windows itself
        return [
            f"data.packing: {cfg.model.path} uses {kinds.unexpressed}, which the flat packed row "
            "(flash_attention_2 with cu_seq_lens) does not express; set data.packing=false"
        ]
    return []
