"""StepMeter with a mixture's sources: per-source loss sums kept on the device a step at a time (a non-finite
step leaves them), units and tokens counted on the host, all in the one reduction of `collect`; and the row
keys they become (training/sources.py)."""

from __future__ import annotations

import torch

from dstrain.checkpoint.state import TrainerState
from dstrain.config.sources import Source
from dstrain.data.mixture import MixturePlan, SourceSpan
from dstrain.data.sources import Mixture
from dstrain.metrics import meter as meter_module
from dstrain.metrics.meter import StepMeter
from dstrain.training.sources import initial_sources, source_row


def test_per_source_sums_leave_out_nonfinite_steps_and_join_the_one_reduction(monkeypatch):
    reductions = []
    real = meter_module.all_reduce_sum
    monkeypatch.setattr(meter_module, "all_reduce_sum", lambda t: reductions.append(t.shape) or real(t))
    meter = StepMeter(per_step=True, sources=2)
    for losses, units, tokens, finite in (
        ([6.0, 1.0], [3, 1], [30, 10], True),
        ([float("nan"), 2.0], [2, 2], [20, 20], False),
        ([2.0, 0.0], [1, 0], [9, 0], True),
    ):
        meter.add(torch.tensor(0.5 if finite else float("nan")), 10, 1, 0.0)
        meter.add_sources(torch.tensor(losses), units, tokens)
        meter.end_step(nonfinite=not finite)
    row = meter.collect(steps=3)
    assert len(reductions) == 1
    losses, units, tokens = (row["sources_now"][i : i + 2] for i in (0, 2, 4))
    assert losses == [8.0, 1.0] and units == [4, 1]  # the NaN step left out, its tokens still trained on
    assert tokens == [59, 30]
    meter.reset()  # a window that drew nothing from any source
    meter.add(torch.tensor(0.5), 10, 1, 0.0)
    assert meter.collect(steps=1)["sources_now"] == [0.0] * 6


def test_a_plain_run_has_no_source_sums():
    meter = StepMeter(per_step=True)
    meter.add(torch.tensor(0.5), 10, 1, 0.0)
    assert "sources_now" not in meter.collect(steps=1)


def test_row_keys_per_source():
    spans = [SourceSpan("rag", 0, 12, 3.0), SourceSpan("general", 12, 5, 1.0)]
    sources = [Source(i, s.name, f"{s.name}.jsonl", s.weight, "sft-rag", 0, 0) for i, s in enumerate(spans)]
    mixture = Mixture(sources, spans, MixturePlan(spans, 4), [[], []])
    state = TrainerState(step=6, sources=initial_sources(mixture, [[], []]))
    row = source_row(mixture, state, [9.0, 0.0, 3, 0, 120, 0])
    assert row == {
        "mix/rag/samples": 18, "mix/rag/tokens": 120, "mix/rag/epoch": 1, "loss/rag": 3.0,
        "mix/general/samples": 6, "mix/general/tokens": 0, "mix/general/epoch": 1, "loss/general": None,
    }  # fmt: skip
    assert state.sources[0]["epoch"] == 1 and state.sources[0]["cursor"] == 6
    assert source_row(mixture, state, [0, 0, 0, 0, 5, 1])["mix/rag/tokens"] == 125  # cumulative
