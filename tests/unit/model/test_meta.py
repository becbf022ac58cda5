"""The dry run's model on the meta device reads as the real build does: the memory estimate's every input
(tensor bytes, 4-bit packing and constants, shapes, attention) equals the one model/memory.py reads from the
model a run builds, with and without 4-bit; and nothing of it holds memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dstrain.config.run import LoraConfig, ModelConfig
from dstrain.model import memory
from dstrain.model.build import build_model
from dstrain.model.meta import meta_model, planned_shape

LORA = LoraConfig(r=8, alpha=16, dropout=0.0)


@pytest.mark.parametrize(
    "model_cfg",
    [ModelConfig(dtype="fp32"), ModelConfig(dtype="bf16", load_in_4bit=True)],
    ids=["fp32", "bf16-4bit"],
)
def test_the_meta_shape_is_the_built_models(model_cfg: ModelConfig):
    planned, attention = planned_shape(model_cfg, LORA, zero_stage=2)
    real = build_model(model_cfg, LORA, zero_stage=2)
    assert planned == replace(memory.model_shape(real), host_resident_bytes=0)
    assert attention == memory.attention_of(real)
    if model_cfg.load_in_4bit:  # the packed weights really are smaller: the comparison saw 4-bit layers
        assert (
            planned.frozen_bytes
            < planned_shape(replace(model_cfg, load_in_4bit=False), LORA, 2)[0].frozen_bytes
        )
        # and quantising on meta left bitsandbytes' cached map where real loads need it (a second real build)
        build_model(model_cfg, LORA, zero_stage=2)


def test_the_meta_model_holds_no_memory_and_marks_zero3_partitioning():
    model = meta_model(ModelConfig(), LORA)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert planned_shape(ModelConfig(), LORA, zero_stage=3)[0].partitioned  # built under zero.Init
    assert not planned_shape(ModelConfig(load_in_4bit=True), LORA, zero_stage=3)[0].partitioned
