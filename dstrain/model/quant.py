"""QLoRA: the frozen base in 4-bit NF4 with double quantisation (bitsandbytes), computed in `model.dtype`.

Only the frozen base is quantised; LoRA adapters train in the run's precision as without 4-bit. The 4-bit
weights are stored packed in tensors of the compute dtype (`bnb_4bit_quant_storage` = `model.dtype`): every
parameter then has the dtype DeepSpeed's engine runs in, so the engine's mixed-precision cast leaves the
packed bytes alone and ZeRO-3 can flatten and partition them like any other frozen weight.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dstrain.config.run import RunConfig

INSTALL_HINT = "`pip install bitsandbytes` (it runs on CPU and CUDA)"

# ZeRO JSON keys that quantise the weights ZeRO moves between ranks. They would read the packed NF4 bytes
# as numbers and round them, corrupting the frozen base.
WEIGHT_QUANTISING_KEYS = ("zero_quantized_weights", "zero_quantized_nontrainable_weights")


def bitsandbytes_missing() -> bool:
    return importlib.util.find_spec("bitsandbytes") is None


def check_qlora(cfg: RunConfig, ds: dict[str, Any]) -> list[str]:
    """Problems of model.load_in_4bit together with the ZeRO JSON (empty when 4-bit is off)."""
    if not cfg.model.load_in_4bit:
        return []
    problems = []
    if bitsandbytes_missing():
        problems.append(f"model.load_in_4bit needs bitsandbytes, which is not installed: {INSTALL_HINT}")
    zero = ds.get("zero_optimization") or {}
    for key in WEIGHT_QUANTISING_KEYS:
        if zero.get(key):
            problems.append(
                f"zero_optimization.{key}=true in the ZeRO JSON would re-quantise the packed 4-bit weights of "
                "model.load_in_4bit and corrupt them: set it to false"
            )
    return problems


@contextmanager
def bitsandbytes_kept_out(load_in_4bit: bool) -> Iterator[None]:
    """Within the block, `import bitsandbytes` fails as if it were not installed (unless `load_in_4bit`).

    PEFT imports bitsandbytes at import time whenever it is installed (peft.helpers), and bitsandbytes pulls
    in torch's compiler stack: ~0.8-1.5 s of CPU on every rank of a run that quantises nothing. A None entry
    in sys.modules makes that import raise ImportError, which PEFT catches, and makes `find_spec` report it
    missing, so PEFT's LoRA dispatch skips its 4-bit layers. Undone on exit: a later 4-bit run in the same
    process (a test, a notebook) imports it normally.
    """
    if load_in_4bit or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]


def import_bitsandbytes() -> Any:
    """bitsandbytes, or one DstrainError that says how to install it."""
    from dstrain.errors import DstrainError

    try:
        import bitsandbytes
    except ImportError as exc:  # missing, or its native library does not load on this machine
        raise DstrainError(
            f"model.load_in_4bit: bitsandbytes cannot be imported ({exc}): {INSTALL_HINT}"
        ) from exc
    return bitsandbytes


def bnb_config(dtype: torch.dtype) -> Any:
    """NF4 + double quantisation, computing and storing in `dtype` (see the module docstring for why)."""
    from transformers import BitsAndBytesConfig

    import_bitsandbytes()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def quant_state(param: torch.Tensor) -> Any:
    """The bitsandbytes QuantState of a packed 4-bit weight, None for any other parameter."""
    return getattr(param, "quant_state", None)


def real_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter represents: for packed 4-bit weights the original shape, not the
    packed storage (two weights per byte, several per element of a bf16/fp32 storage tensor).

    Under ZeRO-3 a partitioned parameter reports its full (packed) size as `ds_numel`.
    """
    state = quant_state(param)
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return int(getattr(param, "ds_numel", param.numel()))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor as stored, whole (a ZeRO-3 parameter built under zero.Init counts its full size
    `ds_numel`); a packed 4-bit weight adds its quantisation constants."""
    size = int(getattr(tensor, "ds_numel", tensor.numel())) * tensor.element_size()
    state = quant_state(tensor)
    return size + (quant_state_bytes(state) if state is not None else 0)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters occupy, 4-bit quantisation constants included (unpartitioned sizes)."""
    return sum(tensor_bytes(param) for param in model.parameters())


def quant_state_bytes(state: Any) -> int:
    """absmax and code of one 4-bit weight; with double quantisation also the offset subtracted from the
    absmax and the absmax's own absmax and code (`state2`)."""
    tensors = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def is_quantized(model: torch.nn.Module) -> bool:
    return any(quant_state(p) is not None for p in model.parameters())


def keep_training_layout(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a Linear4bit forward in eval mode without grad (dstrain's eval and
    generation) rewrites `weight.data` in place into an inference-only layout: later training forwards
    then take an inference kernel, ZeRO-3's partitioned parameters get a foreign tensor swapped in, and
    layers whose out_features are not a multiple of 32 fail outright ("N must be divisible by block_n").
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
