"""Packing for flash-attention (data.packing under flash_attention_2): the micro batch as one unpadded row
with `cu_seq_lens`. No flash-attention on CPU, so an attention function registered for this test attends
exactly as flash-attention's variable-length kernel does, from the keyword arguments transformers hands it:
the flat row must give each sample's separate-forward loss, and fail to without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dstrain.config.run import LoraConfig, ModelConfig
from dstrain.data.batches import IGNORE, Example
from dstrain.data.loader import collate_micro
from dstrain.data.packing import collate_flat
from dstrain.model.build import build_model
from dstrain.model.supervised import SupervisedLM

VARLEN = "dstrain_test_varlen"
seen: list[torch.Tensor] = []


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash_attn_varlen_func's semantics: causal attention inside each [cu[i], cu[i+1]) span."""
    cu = kwargs.get("cu_seq_lens_q")
    length = query.shape[2]
    if cu is None:
        segments = torch.zeros(length, dtype=torch.long)
    else:
        seen.append(cu)
        segments = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff().long())
    mask = (segments[:, None] == segments[None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(VARLEN, varlen_attention)
AttentionMaskInterface.register(VARLEN, sdpa_mask)


@pytest.fixture(scope="module")
def varlen_model():
    model = build_model(ModelConfig(), LoraConfig(dropout=0.0), zero_stage=2)
    model.get_base_model().set_attn_implementation(VARLEN)
    return model.eval()


EXAMPLES = [
    Example([5, 6, 7, 8, 9, 10], [IGNORE, IGNORE, IGNORE, 8, 9, 10]),
    Example([11, 12, 13], [IGNORE, 12, 13]),
    Example([14, 15, 16, 17, 18, 19, 20, 21], [IGNORE] * 5 + [19, 20, 21]),
]


def test_one_row_with_sequence_boundaries():
    batch = collate_flat(EXAMPLES, pad_id=0)
    assert batch["input_ids"].shape == (1, 17) and batch["attention_mask"] is None
    assert batch["cu_seq_lens_q"].tolist() == [0, 6, 9, 17] and batch["max_length_q"] == 8
    assert batch["position_ids"][0].tolist() == [*range(6), *range(3), *range(8)]
    labelled = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    assert labelled == [8, 9, 10, 12, 13, 19, 20, 21]


@pytest.mark.numerics
def test_flat_row_loss_equals_separate_forwards(varlen_model):
    lm = SupervisedLM(varlen_model)
    flat = collate_micro(EXAMPLES, 0, flat=True)
    seen.clear()
    with torch.no_grad():
        nll, n = lm(**flat.inputs)
        assert seen and seen[0].tolist() == [0, 6, 9, 17]  # the boundaries reached the attention
        alone = [lm(**collate_micro([e], 0, flat=True).inputs) for e in EXAMPLES]
        # without the boundaries the samples attend to each other: the check above has teeth
        leaky_inputs = {k: v for k, v in flat.inputs.items() if not k.startswith(("cu_", "max_length"))}
        leaky, _ = lm(**leaky_inputs)
    assert int(n) == sum(int(count) for _, count in alone) == 8
    torch.testing.assert_close(nll, sum(value for value, _ in alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky, nll, atol=1e-3)
    assert flat.tokens == 17 and flat.samples == 3


def test_flat_row_tensors_exactly():
    """transformers' DataCollatorWithFlattening, as collate_flat uses it, gives exactly the layout dstrain
    wrote by hand: a labelled first token of a sample loses its label (it would be predicted from the
    previous sample), int32 boundaries, int max lengths, and the mask slot None."""
    examples = [Example([1, 2, 3], [1, 2, 3]), Example([4], [4]), Example([5, 6], [IGNORE, 6])]
    batch = collate_flat(examples, pad_id=0)
    assert list(batch) == [
        "input_ids", "attention_mask", "labels", "position_ids",
        "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    ]  # fmt: skip
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]] and batch["input_ids"].dtype == torch.long
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, IGNORE, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]] and batch["labels"].dtype == torch.long
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].tolist() == [0, 3, 4, 6] and batch[key].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3 and type(batch["max_length_q"]) is int
    assert batch["attention_mask"] is None
