"""Memory per rank, estimated before the DeepSpeed engine exists, and checked against the device's capacity.

DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs*`) assume every parameter is trained
(16-18 bytes/param of fp32 master, moments and gradients); under LoRA almost nothing is trained, the frozen
base costs only its storage bytes, and what decides whether a run fits is the base, the activations and the
logits. So the model-state part is counted here from the built model's actual tensors (a 4-bit base reports
its packed bytes and quantisation constants), and the rest from the shapes.

Every term is per rank. "device" is the accelerator; on a CPU-only run it is host RAM like everything else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dstrain.errors import DstrainError
from dstrain.model.quant import tensor_bytes, weight_bytes
from dstrain.model.variants import dora_shape

GiB = 1024**3
CUDA_CONTEXT_BYTES = 512 * 1024**2  # CUDA context + allocator slack, outside what PyTorch can allocate
ADAM_STATE_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq per trainable parameter (DeepSpeed always keeps
#                        an fp32 master in ZeRO 1-3, also when the module itself is fp32)


class MemoryCheckError(DstrainError):
    """The estimated memory per rank exceeds what the device (or host) has."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from the built PEFT model: actual tensor bytes and the decoder's shape."""

    frozen_bytes: int  # frozen params + buffers + quantisation constants, as stored now
    trainable_numel: int
    trainable_elem: int  # bytes per element of the LoRA weights in the module
    largest_module_bytes: int  # the biggest block ZeRO-3 gathers at once (a decoder layer, embeddings, head)
    host_resident_bytes: int  # model bytes this process already holds in host RAM
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    vocab: int
    partitioned: bool = False  # built under zero.Init: no rank ever held the whole model
    dora_outputs: int = 0  # DoRA: output features of one layer's adapted linears (variants.dora_shape)
    dora_workspace: int = 0  # DoRA: elements of the largest weight-norm computation, live for a moment


@dataclass(frozen=True)
class Setup:
    """The run's choices that change memory (from the resolved ZeRO JSON and the run config)."""

    stage: int
    world: int
    micro: int  # rows per micro batch (pairs count twice)
    seq: int  # tokens of a row on one rank (max_seq_len / sequence_parallel_size)
    compute_elem: int  # bytes per activation element (model dtype)
    checkpointing: bool
    lora_dropout: bool
    eager_attention: bool
    logits_chunk: int
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: int = 0  # elements
    overlap_comm: bool = False
    prefetch_bucket: int = 0  # elements (ZeRO-3)
    cuda: bool = False


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    where: str  # "device" or "host"


def model_shape(peft_model: nn.Module) -> ModelShape:
    """Read the built (not yet partitioned) model: its tensors' bytes and its decoder config."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    config = base.config
    frozen = trainable = elem = resident = 0
    partitioned = False
    for tensor in [*peft_model.parameters(), *peft_model.buffers()]:
        size = tensor_bytes(tensor)
        held = tensor.ds_tensor if hasattr(tensor, "ds_tensor") else tensor  # a partition under zero.Init
        resident += held.numel() * held.element_size() if held.device.type == "cpu" else 0
        partitioned = partitioned or hasattr(tensor, "ds_tensor")
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            trainable, elem = trainable + tensor.numel(), tensor.element_size()
        else:
            frozen += size
    decoder_layers = getattr(base.get_decoder(), "layers", [])
    blocks = [*decoder_layers, base.get_input_embeddings(), base.get_output_embeddings()]
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    dora_outputs, dora_workspace = dora_shape(peft_model, config.num_hidden_layers)
    return ModelShape(
        dora_outputs=dora_outputs,
        dora_workspace=dora_workspace,
        frozen_bytes=frozen,
        trainable_numel=trainable,
        trainable_elem=elem or 4,
        largest_module_bytes=max((weight_bytes(b) for b in blocks if b is not None), default=0),
        host_resident_bytes=resident,
        partitioned=partitioned,
        layers=config.num_hidden_layers,
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", 4 * hidden),
        heads=heads,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        vocab=config.vocab_size,
    )


def layer_activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """Tensors one decoder layer saves for backward (Llama-style block, LoRA on every linear).

    Per token, in the compute dtype (B bytes): 8h (two RMSNorm in/out, q and k after RoPE, v, attention
    output and its reshaped copy) + 4I (gate, silu(gate), up, their product); PEFT's LoRA dropout, when
    on, saves its own dropped copy of every linear's input plus a 1-byte mask: (6h + I)(B + 1). Eager
    attention also keeps the softmax probabilities: heads x seq^2 per row (fp32, plus a B copy if B < 4).
    Measured on CPU (h 512, seq 512, saved-tensor hooks): 18 units of T*h*4 without dropout (formula: 19),
    30.5 with (formula: 30). DoRA keeps two more outputs of every adapted linear (the base and the LoRA
    output, which the magnitude's gradient needs): 2 x its output features.
    """
    tokens = setup.micro * setup.seq
    b = setup.compute_elem
    per_token = b * (8 * shape.hidden + 4 * shape.intermediate + 2 * shape.dora_outputs)
    if setup.lora_dropout:
        per_token += (b + 1) * (6 * shape.hidden + shape.intermediate)
    size = tokens * per_token
    if setup.eager_attention:
        size += setup.micro * shape.heads * setup.seq**2 * (4 + (b if b < 4 else 0))
    return size


def activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """All layers' saved activations, plus one layer's worth of workspace for backward.

    With gradient checkpointing only each layer's input (tokens x h x B) is kept, and one layer at a time
    is recomputed in full during backward.
    """
    layer = layer_activation_bytes(shape, setup)
    if setup.checkpointing:
        kept = shape.layers * setup.micro * setup.seq * shape.hidden * setup.compute_elem
        return kept + 2 * layer
    return shape.layers * layer + layer


def logits_bytes(shape: ModelShape, setup: Setup, chunk: int | None = None) -> int:
    """Peak memory of the output head and loss.

    dstrain runs the head at supervised positions only, `chunk` at a time (each chunk recomputed in
    backward), so at most chunk x vocab logits exist. Worst case every position is supervised:
    n = min(micro x seq, chunk). Live at once per position: the logits (B), their fp32 copy when B < 4,
    log-softmax (4), and its gradient and the logits' gradient in backward (4 + 4).
    """
    chunk = setup.logits_chunk if chunk is None else chunk
    positions = setup.micro * setup.seq
    n = min(positions, chunk) if chunk > 0 else positions
    b = setup.compute_elem
    per = 12 + b + (4 if b < 4 else 0)
    return n * shape.vocab * per + positions * shape.hidden * b


def estimate(shape: ModelShape, setup: Setup) -> list[Term]:
    """The per-rank memory terms for this model under this ZeRO setup."""
    shard = setup.world if setup.stage == 3 else 1
    opt_shard = setup.world if setup.stage >= 1 else 1
    params_at = "host" if setup.offload_param else "device"
    optim_at = "host" if setup.offload_optimizer else "device"
    trainable = shape.trainable_numel
    terms = [
        Term("base weights (frozen)", shape.frozen_bytes // shard, params_at),
        Term("LoRA weights", trainable * shape.trainable_elem // shard, params_at),
        Term("fp32 master + Adam moments", ADAM_STATE_BYTES * trainable // opt_shard, optim_at),
        Term("fp32 gradient partition", 4 * trainable // opt_shard, optim_at),
        Term("gradient buckets", bucket_bytes(shape, setup), "device"),
    ]
    if setup.stage == 3:
        gathered = shape.largest_module_bytes + setup.prefetch_bucket * setup.compute_elem
        terms.append(Term("ZeRO-3 gathered layer", gathered, "device"))
    terms.append(Term("activations", activation_bytes(shape, setup), "device"))
    if shape.dora_workspace:
        terms.append(
            Term("DoRA weight norm (transient)", shape.dora_workspace * shape.trainable_elem, "device")
        )
    terms.append(Term("logits + loss", logits_bytes(shape, setup), "device"))
    if setup.cuda:
        terms.append(Term("CUDA context", CUDA_CONTEXT_BYTES, "device"))
    return terms


def bucket_bytes(shape: ModelShape, setup: Setup) -> int:
    """DeepSpeed's contiguous gradient bucket: torch.empty(reduce_bucket_size) (two with overlap_comm).

    On CUDA the allocator holds all of it; on CPU only the pages written count, at most the gradients.
    """
    elements = setup.reduce_bucket or shape.trainable_numel
    if not setup.cuda:
        elements = min(elements, shape.trainable_numel)
    return elements * shape.trainable_elem * (2 if setup.overlap_comm else 1)


def build_peak_bytes(shape: ModelShape, setup: Setup) -> int:
    """What building the model holds at its peak. Under zero.Init (ZeRO-3, not 4-bit) each rank only ever
    holds its partition of the base; otherwise the model is built whole, and under ZeRO-3 that copy plus
    this rank's partition is resident for a moment, whatever the training estimate says."""
    full = shape.frozen_bytes + shape.trainable_numel * shape.trainable_elem
    if shape.partitioned:
        return shape.frozen_bytes // setup.world + shape.trainable_numel * shape.trainable_elem
    return full + (full // setup.world if setup.stage == 3 else 0)


def totals(terms: list[Term]) -> dict[str, int]:
    out = {"device": 0, "host": 0}
    for term in terms:
        out[term.where] += term.bytes
    return out


def setup_from(cfg: Any, ds: dict[str, Any], micro: int, world: int, attention: str | None = None) -> Setup:
    """The Setup of a run: `cfg` is the RunConfig, `ds` the resolved ZeRO JSON, `attention` the attention
    implementation the built model really uses (`attention_of`); unknown: model.attn_implementation."""
    from dstrain.config.zero import zero_stage
    from dstrain.model.build import DTYPES

    zero = ds.get("zero_optimization", {})
    pairs = cfg.objective.name != "sft"  # chosen and rejected: two rows' worth of tokens per pair
    sequence = max(1, getattr(cfg.train, "sequence_parallel_size", 1))
    return Setup(
        stage=zero_stage(ds),
        world=world,
        micro=micro * (2 if pairs else 1),
        # sequence parallelism: each rank holds 1/N of every row's activations and logits (the Ulysses
        # attention runs sdpa on 1/N of the heads, so no eager [seq, seq] scores)
        seq=-(-cfg.data.max_seq_len // sequence),
        compute_elem=DTYPES[cfg.model.dtype].itemsize,
        checkpointing=cfg.model.gradient_checkpointing,
        lora_dropout=cfg.lora.dropout > 0,
        eager_attention=(attention or cfg.model.attn_implementation) == "eager" and sequence == 1,
        logits_chunk=cfg.model.logits_chunk_tokens,
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device") == "cpu",
        offload_param=(zero.get("offload_param") or {}).get("device") == "cpu",
        reduce_bucket=int(zero.get("reduce_bucket_size", 5e8)),
        overlap_comm=bool(zero.get("overlap_comm", False)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 0)) if zero_stage(ds) == 3 else 0,
        cuda=torch.cuda.is_available(),
    )


def attention_of(model: nn.Module) -> str | None:
    """What the loaded model's attention really runs: with model.attn_implementation=auto transformers
    picks it per model (eager for Gemma-2, whose [seq, seq] score matrices the estimate must count)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None)


def local_ranks() -> int:
    """Ranks on this host: torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        try:
            return max(1, int(os.environ[key]))
        except (KeyError, ValueError):
            continue
    return 1


def capacities(shape: ModelShape, cuda: bool) -> dict[str, int]:
    """Bytes per rank: the GPU's total memory; the host's available RAM shared among this host's ranks.

    This process already holds the built model in host RAM (it is not in `available` any more), so it is
    added back: the estimate counts it too.
    """
    import psutil

    host = psutil.virtual_memory().available // local_ranks() + shape.host_resident_bytes
    if not cuda:
        return {"device": host, "host": host}
    device = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return {"device": int(device), "host": host}


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


def peak_estimate(shape: ModelShape, setup: Setup) -> int:
    """Everything of one rank in one place (a CPU-only run): max of the build and the training estimates."""
    return max(build_peak_bytes(shape, setup), sum(t.bytes for t in estimate(shape, setup)))


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark since the last reset (VmHWM), Linux."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so a peak can be measured from a point on."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")


def table(terms: list[Term], caps: dict[str, int], cuda: bool, build_peak: int) -> Any:
    """A rich Table of the terms, with totals against capacity per place."""
    from rich.table import Table

    place = {"device": "GPU" if cuda else "host", "host": "host (offload)" if cuda else "host"}
    out = Table(title="estimated memory per rank", title_justify="left", show_edge=False)
    for column in ("term", "where", "estimate"):
        out.add_column(column, justify="right" if column == "estimate" else "left")
    for term in terms:
        if term.bytes:
            out.add_row(term.name, place[term.where], gib(term.bytes))
    for where, total in merged_totals(terms, cuda).items():
        out.add_row(f"[bold]total {where}[/]", "", f"[bold]{gib(total)}[/] of {gib(caps[where])}")
    out.add_row("model build (before ZeRO moves it)", "host", gib(build_peak))
    return out


def merged_totals(terms: list[Term], cuda: bool) -> dict[str, int]:
    """On a CPU-only run device and host are the same RAM: one total."""
    sums = totals(terms)
    if not cuda:
        return {"device": sums["device"] + sums["host"]}
    return {where: size for where, size in sums.items() if size or where == "device"}


FIXES = (
    "ZeRO-3 (--ds-config zero3.json) partitions the base weights across ranks; offload_optimizer / "
    "offload_param (zero2_offload.json, zero3_offload.json) move optimizer state / weights to host RAM; "
    "model.load_in_4bit=true stores the base in 4 bits; model.gradient_checkpointing=true keeps one input "
    "per layer instead of all activations; a smaller train_micro_batch_size_per_gpu or data.max_seq_len "
    "shrinks activations and logits; or --set train.memory_check=warn to try anyway"
)


def overflow_message(terms: list[Term], caps: dict[str, int], cuda: bool) -> str | None:
    """One message naming each place whose estimate exceeds its capacity, the biggest terms and the fixes."""
    over = []
    for where, total in merged_totals(terms, cuda).items():
        if total > caps[where]:
            name = ("GPU memory" if where == "device" else "host RAM (offload)") if cuda else "host RAM"
            biggest = sorted((t for t in terms if t.where == where or not cuda), key=lambda t: -t.bytes)[:3]
            parts = ", ".join(f"{t.name} {gib(t.bytes)}" for t in biggest)
            over.append(
                f"estimated {gib(total)} of {name} per rank exceeds the {gib(caps[where])} available "
                f"by {gib(total - caps[where])} (largest: {parts})"
            )
    if not over:
        return None
    return "memory check: " + "; ".join(over) + ".\nTo fit: " + FIXES


def check(cfg: Any, ds: dict[str, Any], micro: int, world: int, peft_model: nn.Module) -> Any | None:
    """Estimate, compare with capacity, and act on train.memory_check; returns the table to print (or None).

    "error" raises MemoryCheckError, "warn" prints the message on stderr of rank 0 and goes on.
    """
    if cfg.train.memory_check == "off":
        return None
    shape = model_shape(peft_model)
    setup = setup_from(cfg, ds, micro, world, attention_of(peft_model))
    terms = estimate(shape, setup)
    caps = capacities(shape, setup.cuda)
    message = overflow_message(terms, caps, setup.cuda)
    if message and cfg.train.memory_check == "error":
        raise MemoryCheckError(message)
    if message and os.environ.get("RANK", "0") == "0":
        import sys

        print(f"warning: {message}", file=sys.stderr)
    return table(terms, caps, setup.cuda, build_peak_bytes(shape, setup))
