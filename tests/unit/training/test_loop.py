"""dstrain.training.loop without a process group or a subprocess: the step arithmetic, the logging, eval and
save schedule, stop requests and non-finite steps.

DeepSpeed's engine is replaced at its boundary by tests/unit/standin_engine.py over the bundled tiny
model. Checkpoint writing is recorded instead of done (it needs the real engine; the integration and
distributed tests cover it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dstrain.checkpoint.state import TrainerState
from dstrain.config.run import DataConfig, LoraConfig, ModelConfig, ObjectiveConfig, TrainConfig
from dstrain.config.zero import BatchPlan
from dstrain.data.batches import tokenize_record
from dstrain.data.loader import collate_micro
from dstrain.data.records import RagRecord
from dstrain.distributed.stop import StopRequest
from dstrain.errors import DataError, TrainingError
from dstrain.eval.sets import EvalSet
from dstrain.metrics.sinks import MetricsSink
from dstrain.model.build import build_model
from dstrain.model.supervised import SupervisedLM
from dstrain.training import loop
from dstrain.training.session import Run, Tally
from tests.unit.standin_engine import StandInEngine

CFG = DataConfig(max_seq_len=128, max_passage_tokens=48)


@pytest.fixture(scope="module")
def peft_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(), LoraConfig(dropout=0.0), zero_stage=2)


@pytest.fixture(scope="module")
def examples(tokenizer):
    records = [
        RagRecord(query=f"What is code {i}?", passages=(f"The code {i} is {i * 7}.",), answer=f"{i * 7}")
        for i in range(8)
    ]
    return [tokenize_record(tokenizer, record, CFG) for record in records]


def make_run(tmp_path: Path, peft_model, examples, tokenizer, *, total: int = 4, **train: object):
    plan = BatchPlan(micro=2, accumulation=2, world=1)
    batches = (
        collate_micro(examples[i % 4 * 2 : i % 4 * 2 + 2], tokenizer.pad_token_id) for i in range(10**6)
    )
    engine = StandInEngine(SupervisedLM(peft_model, logits_chunk_tokens=64), plan.accumulation)
    run = Run(
        train=TrainConfig(**{"log_every": 2, **train}),
        data=CFG,
        objective=ObjectiveConfig(),
        ds={},
        plan=plan,
        engine=engine,
        peft_model=peft_model,
        batches=batches,
        eval_sets=[EvalSet("", examples[:3])],
        steps_per_epoch=3,
        total_steps=total,
        output_dir=tmp_path,
        run_files=None,
        pad_id=tokenizer.pad_token_id,
        rank=0,
        sink=MetricsSink(tmp_path, total, enabled=True),
        stop=StopRequest(),
        num_params=1,
    )
    return run, Tally(records_seen=8)


@pytest.fixture
def saved(monkeypatch) -> list[int]:
    steps: list[int] = []
    monkeypatch.setattr(loop, "save", lambda run, state: steps.append(state.step))
    return steps


def rows(run: Run, kind: str = "loss") -> list[dict]:
    """The metrics.jsonl rows that carry `kind` (train rows carry "loss", eval rows "eval_loss")."""
    run.sink.close()
    lines = (run.output_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if kind in row]


def test_every_step_runs_logs_on_schedule_and_saves_at_the_end(
    tmp_path, peft_model, examples, tokenizer, saved
):
    run, tally = make_run(tmp_path, peft_model, examples, tokenizer, total=4)
    state = loop.fit(run, tally, TrainerState())
    assert state.step == 4 and run.engine.optimizer_steps == 4 and run.engine.micro_steps == 8
    assert saved == [4]  # save_every=0: the last step only
    logged = rows(run)
    assert [row["step"] for row in logged] == [2, 4]
    # tokens count the non-padding tokens of every micro batch trained on; samples the global batches
    per_step = sum(collate_micro(examples[i : i + 2], tokenizer.pad_token_id).tokens for i in (0, 2))
    assert (
        logged[-1]["tokens"]
        == state.tokens
        == 2 * per_step
        + 2 * sum(collate_micro(examples[i : i + 2], tokenizer.pad_token_id).tokens for i in (4, 6))
    )
    assert logged[-1]["samples"] == state.samples == 4 * run.plan.global_batch
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)


def test_the_data_position_follows_the_step_across_epochs():
    state, plan = TrainerState(), BatchPlan(micro=2, accumulation=3, world=2)
    positions = []
    for _ in range(7):
        loop.advance_position(state, plan, steps_per_epoch=3)
        positions.append((state.step, state.epoch, state.cursor, state.samples))
    assert positions[2] == (3, 1, 0, 36) and positions[3] == (4, 1, 12, 48) and positions[6] == (7, 2, 12, 84)


def test_due_on_the_schedule_and_at_the_last_step():
    assert [s for s in range(1, 11) if loop.due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if loop.due(s, 0, 10)] == [10]


def test_a_stop_request_logs_saves_and_ends_after_the_step(tmp_path, peft_model, examples, tokenizer, saved):
    run, tally = make_run(tmp_path, peft_model, examples, tokenizer, total=6, log_every=5)
    run.stop.signal = 15  # as the SIGTERM handler sets it
    state = loop.fit(run, tally, TrainerState())
    assert state.step == 1 and saved == [1]
    assert [row["step"] for row in rows(run)] == [1]  # logged first: the checkpoint's token count is exact


def test_eval_at_step_zero_and_on_schedule_tracks_the_best(tmp_path, peft_model, examples, tokenizer, saved):
    run, tally = make_run(tmp_path, peft_model, examples, tokenizer, total=4, eval_every=2)
    state = loop.fit(run, tally, TrainerState())
    evals = rows(run, "eval_loss")
    assert [row["step"] for row in evals] == [0, 2, 4]
    best = min(evals, key=lambda row: row["eval_loss"])
    assert state.best_step == best["step"] and state.best_metric == pytest.approx(best["eval_loss"])


def test_higher_is_better_metrics_are_stored_negated():
    state = TrainerState(step=3)
    loop.note_best(state, "eval_pref_acc", {"eval_pref_acc": 0.75})
    state.step = 5
    loop.note_best(state, "eval_pref_acc", {"eval_pref_acc": 0.5})
    assert (state.best_step, state.best_metric) == (3, -0.75)


def test_the_best_follows_a_named_sets_metric_not_the_whole():
    state = TrainerState()
    for step, whole, rag in ((1, 3.0, 2.0), (2, 2.5, 2.2), (3, 2.0, 2.4)):
        state.step = step
        loop.note_best(state, "eval_loss/rag", {"eval_loss": whole, "eval_loss/rag": rag})
    assert (state.best_step, state.best_metric) == (1, 2.0)
    state.step = 4
    loop.note_best(state, "eval_pref_acc/rag", {"eval_pref_acc/rag": 0.75})
    assert (state.best_step, state.best_metric) == (4, -0.75)  # higher is better: stored negated


def test_step_flags_without_a_process_group_are_this_ranks_own():
    assert loop.step_flags(False, torch.tensor(False), 0) == (False, False, False)
    assert loop.step_flags(True, torch.tensor(True), 2) == (True, True, True)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, peft_model, examples, tokenizer):
    run, tally = make_run(tmp_path, peft_model, examples, tokenizer, max_nonfinite_steps=2)
    run.engine.applied = False
    state = TrainerState(step=7)
    loop.on_nonfinite(run, tally, state)
    assert state.nonfinite_steps == 1
    with pytest.raises(TrainingError, match="2 optimizer steps in a row"):
        loop.on_nonfinite(run, tally, state)


def test_a_nonfinite_update_that_was_applied_stops_at_once(tmp_path, peft_model, examples, tokenizer):
    run, tally = make_run(tmp_path, peft_model, examples, tokenizer)
    with pytest.raises(TrainingError, match="applied the update anyway"):
        loop.on_nonfinite(run, tally, TrainerState(step=3))


def test_bad_records_over_the_limit_stop_the_run_with_counts():
    tally = Tally(index_bad=3, records_seen=100)
    loop.check_bad_fraction(tally, 0.05)
    with pytest.raises(DataError, match=r"3 of 100 records .*3\.0%.*max_bad_fraction=1\.0%"):
        loop.check_bad_fraction(tally, 0.01)


def test_a_failed_record_is_named_with_the_resume_command(tmp_path):
    with pytest.raises(DataError, match="on another rank") as info:
        loop.fail_on_bad_records(Tally(), tmp_path, 9)
    assert f"dstrain resume {tmp_path}" in str(info.value) and "step 9" in str(info.value)
