"""StepMeter: what one logged row promises, single process (the cross-rank sum is then the identity)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dstrain.metrics import meter as meter_module
from dstrain.metrics.meter import StepMeter, pair_metrics


class _Clock:
    """A perf_counter the test moves by hand, so throughput is exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(meter_module, "time", SimpleNamespace(perf_counter=clock))
    return clock


def test_loss_is_the_mean_over_micro_batches_not_tokens(clock):
    meter = StepMeter()
    meter.add(torch.tensor(1.0), tokens=10, samples=1, data_wait_s=0.5)
    meter.add(torch.tensor(3.0), tokens=30, samples=2, data_wait_s=0.25, skipped=1)
    row = meter.collect(steps=1)
    assert row["loss"] == pytest.approx(2.0)  # a token-weighted mean would be 2.5
    assert (row["tokens"], row["samples"], row["skipped_now"]) == (40, 3, 1)
    assert row["data_wait_s"] == pytest.approx(0.75)  # summed over micro batches (one rank)
    assert isinstance(row["tokens"], int) and isinstance(row["samples"], int)


def test_throughput_leaves_out_excluded_time(clock):
    meter = StepMeter()
    meter.add(torch.tensor(1.0), tokens=600, samples=6, data_wait_s=0.0)
    clock.now += 10.0
    meter.exclude(4.0)  # eval or save time inside the window
    row = meter.collect(steps=3)
    assert row["tokens_per_s"] == pytest.approx(600 / 6.0)
    assert row["samples_per_s"] == pytest.approx(6 / 6.0)
    assert row["step_time_s"] == pytest.approx(6.0 / 3)


def test_no_elapsed_time_does_not_divide_by_zero(clock):
    meter = StepMeter()
    meter.add(torch.tensor(1.0), tokens=5, samples=1, data_wait_s=0.0)
    row = meter.collect(steps=0)
    assert row["tokens_per_s"] > 0 and row["step_time_s"] > 0


def test_reset_starts_a_new_window(clock):
    meter = StepMeter()
    meter.add(torch.tensor(5.0), tokens=50, samples=5, data_wait_s=1.0, skipped=2)
    meter.exclude(1.0)
    clock.now += 2.0
    meter.reset()
    assert (meter.loss_sum, meter.pairs, meter.nonfinite, meter.finite) == (None, None, None, None)
    assert (meter.micro_batches, meter.tokens, meter.samples, meter.skipped) == (0, 0, 0, 0)
    assert (meter.data_wait_s, meter.excluded_s, meter.started) == (0.0, 0.0, clock.now)
    meter.add(torch.tensor(1.0), tokens=7, samples=1, data_wait_s=0.0)
    clock.now += 1.0
    row = meter.collect(steps=1)
    assert (row["loss"], row["tokens"], row["skipped_now"]) == (1.0, 7, 0)
    assert row["tokens_per_s"] == pytest.approx(7.0)


def test_nonfinite_losses_are_counted_per_step_and_left_out_of_the_mean(clock):
    meter = StepMeter()
    meter.add(torch.tensor(2.0), tokens=1, samples=1, data_wait_s=0.0)
    meter.add(torch.tensor(float("nan")), tokens=1, samples=1, data_wait_s=0.0)
    meter.add(torch.tensor(float("inf")), tokens=1, samples=1, data_wait_s=0.0)
    assert meter.take_nonfinite().item() == 2
    assert meter.take_nonfinite().item() == 0  # taken: the next step starts from zero
    meter.add(torch.tensor(4.0), tokens=1, samples=1, data_wait_s=0.0)
    assert meter.take_nonfinite().item() == 0
    row = meter.collect(steps=2)
    assert row["loss"] == pytest.approx(3.0)  # (2 + 4) / 2 finite micro batches
    assert row["tokens"] == 4  # the tokens of skipped micro batches were still read


def test_only_nonfinite_losses_give_no_loss(clock):
    meter = StepMeter()
    meter.add(torch.tensor(float("nan")), tokens=3, samples=1, data_wait_s=0.0)
    row = meter.collect(steps=1)
    assert row["loss"] is None
    assert row["tokens"] == 3


def test_loss_is_detached_and_not_synced(clock):
    weight = torch.tensor(2.0, requires_grad=True)
    meter = StepMeter()
    meter.add(weight * 3, tokens=1, samples=1, data_wait_s=0.0)
    assert not meter.loss_sum.requires_grad
    assert torch.is_tensor(meter.loss_sum)  # kept on device until collect()


def test_pair_sums_count_only_real_pairs(clock):
    meter = StepMeter()
    meter.add(torch.tensor(1.0), tokens=1, samples=2, data_wait_s=0.0)
    valid = torch.tensor([1.0, 1.0, 0.0])  # the third pair is filler
    meter.add_pairs(
        chosen=torch.tensor([0.3, -0.1, 9.0]),
        rejected=torch.tensor([0.1, 0.2, 9.0]),
        margin=torch.tensor([0.2, -0.3, 9.0]),
        valid=valid,
    )
    meter.add(torch.tensor(1.0), tokens=1, samples=1, data_wait_s=0.0)
    meter.add_pairs(torch.tensor([0.5]), torch.tensor([-0.5]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert meter.pairs.tolist() == pytest.approx([0.7, -0.2, 0.9, 2.0, 3.0])
    row = meter.collect(steps=1)
    assert row["rewards_chosen"] == pytest.approx(0.7 / 3)
    assert row["rewards_rejected"] == pytest.approx(-0.2 / 3)
    assert row["reward_margin"] == pytest.approx(0.9 / 3)
    assert row["pref_acc"] == pytest.approx(2 / 3)


def test_sft_rows_carry_no_pair_metrics(clock):
    meter = StepMeter()
    meter.add(torch.tensor(1.0), tokens=1, samples=1, data_wait_s=0.0)
    assert not {"rewards_chosen", "pref_acc"} & set(meter.collect(steps=1))


def test_pair_metrics_of_no_pairs():
    assert pair_metrics([]) == {}
    zero = pair_metrics([0.0, 0.0, 0.0, 0.0, 0.0])  # only filler pairs: zeros, not a division by zero
    assert zero == {"rewards_chosen": 0.0, "rewards_rejected": 0.0, "reward_margin": 0.0, "pref_acc": 0.0}
