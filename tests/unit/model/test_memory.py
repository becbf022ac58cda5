"""The memory estimate's arithmetic, its reading of real models, and the check's verdicts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import PeftModel

from dstrain.config.run import LoraConfig, ModelConfig, RunConfig
from dstrain.model import memory, quant
from dstrain.model.build import build_model, count_parameters

# A 7B-like shape (Llama-2-7B: 32 layers, h 4096, I 11008, vocab 32000), LoRA r16 on all linear layers.
SHAPE = memory.ModelShape(
    frozen_bytes=2 * 6_738_000_000,
    trainable_numel=40_000_000,
    trainable_elem=2,
    largest_module_bytes=2 * 32000 * 4096,
    host_resident_bytes=0,
    layers=32,
    hidden=4096,
    intermediate=11008,
    heads=32,
    kv_dim=4096,
    vocab=32000,
)
SETUP = memory.Setup(
    stage=2,
    world=8,
    micro=4,
    seq=2048,
    compute_elem=2,
    checkpointing=False,
    lora_dropout=True,
    eager_attention=False,
    logits_chunk=1024,
    reduce_bucket=200_000_000,
    cuda=True,
)


def by_name(terms: list[memory.Term]) -> dict[str, memory.Term]:
    return {t.name: t for t in terms}


def test_zero3_holds_one_world_th_of_the_base():
    z2 = by_name(memory.estimate(SHAPE, SETUP))
    z3 = by_name(memory.estimate(SHAPE, replace(SETUP, stage=3)))
    assert z3["base weights (frozen)"].bytes == pytest.approx(z2["base weights (frozen)"].bytes / 8, rel=1e-6)
    assert z3["LoRA weights"].bytes == pytest.approx(z2["LoRA weights"].bytes / 8, rel=1e-6)
    assert "ZeRO-3 gathered layer" in z3 and "ZeRO-3 gathered layer" not in z2


def test_offload_moves_optimizer_bytes_from_device_to_host():
    plain = memory.totals(memory.estimate(SHAPE, SETUP))
    offloaded = memory.totals(memory.estimate(SHAPE, replace(SETUP, offload_optimizer=True)))
    moved = (memory.ADAM_STATE_BYTES + 4) * SHAPE.trainable_numel // 8
    assert plain["host"] == 0 and offloaded["host"] == moved
    assert plain["device"] - offloaded["device"] == moved
    params = memory.totals(memory.estimate(SHAPE, replace(SETUP, stage=3, offload_param=True)))
    assert params["host"] >= SHAPE.frozen_bytes // 8  # the base partition lives in host RAM


def test_checkpointing_shrinks_activations():
    full = memory.activation_bytes(SHAPE, SETUP)
    ckpt = memory.activation_bytes(SHAPE, replace(SETUP, checkpointing=True))
    assert ckpt < full / 5
    assert memory.activation_bytes(SHAPE, replace(SETUP, micro=2)) == pytest.approx(full / 2)


def test_chunked_logits_are_far_below_full_logits_at_32k_vocab():
    chunked = memory.logits_bytes(SHAPE, SETUP)
    full = memory.logits_bytes(SHAPE, SETUP, chunk=0)
    assert full > 4 * 2048 * 32000 * 4  # at least the fp32 [batch, seq, vocab] tensor
    assert chunked < full / 6


def test_gpu_bucket_is_reserved_in_full_but_cpu_counts_written_pages():
    gpu = memory.bucket_bytes(SHAPE, SETUP)
    cpu = memory.bucket_bytes(SHAPE, replace(SETUP, cuda=False))
    assert gpu == 200_000_000 * 2 and cpu == SHAPE.trainable_numel * 2
    assert memory.bucket_bytes(SHAPE, replace(SETUP, overlap_comm=True)) == 2 * gpu


def tiny(dtype: str = "fp32", dropout: float = 0.0) -> torch.nn.Module:
    return build_model(ModelConfig(dtype=dtype), LoraConfig(r=8, dropout=dropout), zero_stage=2)


def test_model_shape_reads_the_built_tensors():
    fp32, bf16 = memory.model_shape(tiny()), memory.model_shape(tiny("bf16"))
    trainable, total = count_parameters(tiny())
    assert fp32.trainable_numel == trainable
    assert fp32.frozen_bytes >= 4 * (total - trainable)  # + buffers (rotary frequencies)
    assert bf16.frozen_bytes < 0.6 * fp32.frozen_bytes
    assert fp32.host_resident_bytes == fp32.frozen_bytes + 4 * trainable
    assert (fp32.layers, fp32.hidden, fp32.vocab) == (2, 128, 2048)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_layer_formula_matches_the_tensors_autograd_saves(dropout):
    """Count the bytes autograd saves for one decoder layer (parameters excluded) against the formula."""
    model = tiny(dropout=dropout)
    layer = model.get_base_model().get_decoder().layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    micro, seq, hidden = 2, 128, 128
    x = torch.randn(micro, seq, hidden, requires_grad=True)
    rotary = model.get_base_model().model.rotary_emb
    position = rotary(x, torch.arange(seq).unsqueeze(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=position, attention_mask=None).sum()
    shape = memory.model_shape(model)
    setup = replace(SETUP, micro=micro, seq=seq, compute_elem=4, lora_dropout=dropout > 0, cuda=False)
    assert memory.layer_activation_bytes(shape, setup) == pytest.approx(sum(saved.values()), rel=0.2)


def test_overflow_message_names_the_excess_and_the_fixes():
    terms = memory.estimate(SHAPE, SETUP)
    device = memory.totals(terms)["device"]
    assert memory.overflow_message(terms, {"device": device + 1, "host": 1}, cuda=True) is None
    message = memory.overflow_message(terms, {"device": device // 2, "host": 1}, cuda=True)
    assert "GPU memory" in message and "exceeds" in message and "base weights" in message
    for fix in ("zero3.json", "offload", "load_in_4bit", "gradient_checkpointing", "memory_check=warn"):
        assert fix in message


def test_check_acts_on_memory_check(monkeypatch):
    model = tiny()
    cfg = RunConfig()
    ds = {"zero_optimization": {"stage": 2}}
    assert memory.check(cfg, ds, 1, 1, model) is not None  # fits: the table
    monkeypatch.setattr(memory, "capacities", lambda shape, cuda: {"device": 1024, "host": 1024})
    with pytest.raises(memory.MemoryCheckError, match="exceeds"):
        memory.check(cfg, ds, 1, 1, model)
    cfg.train.memory_check = "warn"
    assert memory.check(cfg, ds, 1, 1, model) is not None
    cfg.train.memory_check = "off"
    assert memory.check(cfg, ds, 1, 1, model) is None


def packed_4bit(rows: int, cols: int, storage: torch.dtype = torch.float32) -> torch.nn.Parameter:
    """A double-quantised NF4 weight packed into `storage`, as QLoRA builds them (quant.bnb_config)."""
    bnb = pytest.importorskip("bitsandbytes")
    weight = bnb.nn.Params4bit(
        torch.randn(rows, cols), requires_grad=False, quant_type="nf4", quant_storage=storage
    )
    return weight._quantize("cpu")


def test_4bit_bytes_count_the_packed_storage_and_every_quantisation_constant():
    weight = packed_4bit(64, 64)
    state = weight.quant_state
    constants = [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    expected = 64 * 64 // 2 + sum(t.numel() * t.element_size() for t in constants)
    holder = torch.nn.Module()
    holder.weight = weight
    # one function behind the memory estimate and quant.weight_bytes
    assert memory.tensor_bytes(weight) == quant.weight_bytes(holder) == expected


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_parameter_count_equals_peft_s_on_whole_packings(load_in_4bit: bool):
    if load_in_4bit:
        pytest.importorskip("bitsandbytes")
    model = build_model(ModelConfig(dtype="bf16", load_in_4bit=load_in_4bit), LoraConfig(r=8), zero_stage=2)
    assert count_parameters(model) == model.get_nb_trainable_parameters()


def test_parameter_count_is_the_real_one_where_peft_counts_4bit_padding():
    """Why count_parameters is not PEFT's: 7 weights pack into 4 bytes, one fp32 storage element, and PEFT
    infers 8 weights from the storage; the quant state knows the real shape."""
    holder = torch.nn.Module()
    holder.weight = packed_4bit(7, 1)
    assert count_parameters(holder) == (0, 7)
    assert PeftModel.get_nb_trainable_parameters(holder) == (0, 8)
