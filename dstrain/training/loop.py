"""The training loop: objective -> backward -> step -> metrics -> eval -> checkpoint. Short on purpose."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from peft import PeftModel

from dstrain import engine as eng
from dstrain.checkpoint.save import RunFiles, TrainerState, save_checkpoint
from dstrain.config.run import HIGHER_IS_BETTER, RunConfig
from dstrain.config.zero import BatchPlan
from dstrain.data.batches import Example, MicroBatch
from dstrain.data.pairs import PairExample
from dstrain.data.prefetch import paused
from dstrain.data.records import BadRecord
from dstrain.distributed import collectives
from dstrain.distributed.stop import StopRequest
from dstrain.errors import DataError, TrainingError
from dstrain.eval.generation import GenerationEval, evaluate_generation
from dstrain.eval.loss import evaluate
from dstrain.eval.reference import lookup
from dstrain.metrics.meter import MetricsSink, StepMeter, device_stats, max_over_ranks, mfu
from dstrain.objectives.losses import sft_loss
from dstrain.objectives.preference import mean_over_pairs, score_pairs


@dataclass
class Session:
    """What the loop needs, built once by `dstrain.train`."""

    cfg: RunConfig
    ds: dict[str, Any]
    plan: BatchPlan
    engine: DeepSpeedEngine
    peft_model: PeftModel
    batches: Iterator[MicroBatch]
    eval_examples: list[Example] | list[PairExample]
    steps_per_epoch: int
    total_steps: int
    output_dir: Path
    run_files: RunFiles
    pad_id: int
    rank: int
    sink: MetricsSink
    skipped_records: int = 0  # bad training records dropped under data.on_error=skip (index + tokenising)
    records_seen: int = 0  # good + bad training records, the base of data.max_bad_fraction
    failed_records: list[BadRecord] = field(default_factory=list)  # this step's, under data.on_error=fail
    stop: StopRequest | None = None
    nonfinite_in_a_row: int = 0
    num_params: int = 0  # all parameters (base + adapter), for the MFU estimate
    generation: GenerationEval | None = None  # train.eval_generate > 0
    reference_table: torch.Tensor | None = None  # objective.precompute_reference: [records, 2] log-probs


def micro_step(session: Session, meter: StepMeter) -> None:
    """One micro batch: fetch (timed), forward, backward, and an optimizer step at the boundary."""
    started = time.perf_counter()
    batch = next(session.batches)
    waited = time.perf_counter() - started
    loss = micro_loss(session, batch, meter)
    eng.backward(session.engine, loss)
    eng.step(session.engine)
    meter.add(loss, batch.tokens, batch.samples, waited, skipped=len(batch.bad))
    if batch.bad:
        note_bad_records(session, batch.bad)


def micro_loss(session: Session, batch: MicroBatch, meter: StepMeter) -> torch.Tensor:
    """The objective's loss of one micro batch: SFT's NLL per token, or the mean preference loss per pair."""
    if session.cfg.objective.name == "sft":
        nll_sum, num_tokens = eng.forward(session.engine, batch.inputs)
        return sft_loss(nll_sum, num_tokens)
    if session.reference_table is None:
        policy, reference, tokens = eng.forward(session.engine, batch.inputs, pairs=True)
    else:
        policy, _, tokens = eng.forward(session.engine, batch.inputs, pairs=True, reference=False)
        reference = lookup(session.reference_table, batch.indices, policy)
    scores = score_pairs(session.cfg.objective, policy, reference, tokens)
    meter.add_pairs(scores.chosen_rewards, scores.rejected_rewards, scores.margin, scores.valid)
    return mean_over_pairs(scores.loss, scores.valid)


def note_bad_records(session: Session, bad: list[BadRecord]) -> None:
    """Records that could not be tokenised: reported by the rank that read them, then failed or skipped."""
    if session.cfg.data.on_error == "fail":
        session.failed_records += bad
        return
    session.failed_records += [record for record in bad if record.fatal]
    for record in (record for record in bad if not record.fatal):
        message = f"warning: {record} (skipped: data.on_error=skip)"
        if session.rank == 0:
            session.sink.print(f"[yellow]{message}[/]")
        else:
            print(f"[rank {session.rank}] {message}", file=sys.stderr)


def fail_on_bad_records(session: Session, step: int) -> None:
    """Every rank raises together (the step's flags said some rank met a bad record under on_error=fail)."""
    mine = "\n".join(f"  {record}" for record in session.failed_records)
    found = f"\n{mine}" if mine else " on another rank (its message names the record)"
    raise DataError(
        f"data.train: step {step} met record(s) it cannot train on{found}\n"
        "Fix or remove them (or raise data.max_seq_len for over-long prompts), or continue past over-long "
        f"prompts with `dstrain resume {session.output_dir} --set data.on_error=skip --set "
        "data.max_bad_fraction=0.01`; the last checkpoint is intact."
    )


def check_bad_fraction(session: Session) -> None:
    limit = session.cfg.data.max_bad_fraction
    fraction = session.skipped_records / max(1, session.records_seen)
    if fraction > limit:
        raise DataError(
            f"data.train: {session.skipped_records} of {session.records_seen} records were skipped as bad "
            f"({fraction:.1%}), over data.max_bad_fraction={limit:.1%}; the warnings above name them. "
            "Fix the data, or raise data.max_bad_fraction and `dstrain resume` the run."
        )


def due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def log_train(session: Session, state: TrainerState, meter: StepMeter, steps: int) -> None:
    row = meter.collect(steps)
    state.tokens += row["tokens"]
    row.update(step=state.step, lr=eng.current_lr(session.engine), epoch=state.epoch)
    row.update(max_over_ranks(device_stats()))  # a collective: every rank logs the same steps
    utilisation = mfu(row["tokens_per_s"], session.num_params, session.plan.world)
    if utilisation is not None:
        row["mfu"] = utilisation
    row["tokens"] = state.tokens
    row["samples"] = state.samples
    session.skipped_records += row.pop("skipped_now")
    row["skipped_records"] = session.skipped_records
    row["skipped_steps"] = state.nonfinite_steps
    norm = eng.grad_norm(session.engine)
    if norm is not None:
        row["grad_norm"] = norm
    session.sink.log(dict(sorted(row.items(), key=lambda kv: kv[0] != "step")))
    meter.reset()
    check_bad_fraction(session)  # the same numbers on every rank: all raise, or none


def run_eval(session: Session, state: TrainerState) -> dict[str, float] | None:
    if not session.eval_examples:
        return None
    result = evaluate(
        session.engine,
        session.eval_examples,
        session.plan.micro,
        session.rank,
        session.plan.world,
        session.pad_id,
        session.cfg.objective,
        session.cfg.data.share_prompt,
    )
    if session.generation:  # it uses the tokenizer, which the prefetch thread must not use meanwhile
        world = session.plan.world
        with eng.evaluating(session.engine), paused(session.batches):
            result |= evaluate_generation(
                session.peft_model, session.generation, session.plan.micro, session.rank, world
            )
    session.sink.log({"step": state.step, **result})
    name = session.cfg.train.best_metric
    value = -result[name] if name in HIGHER_IS_BETTER else result[name]  # stored so that lower is better
    if state.best_metric is None or value < state.best_metric:
        # best_checkpoint follows only if this step is saved (save() sets it): no stale "best" is protected.
        state.best_metric, state.best_step, state.best_checkpoint = value, state.step, None
    return result


def advance_position(session: Session, state: TrainerState) -> None:
    state.step += 1
    state.samples = state.step * session.plan.global_batch
    state.epoch, slot = divmod(state.step, session.steps_per_epoch)
    state.cursor = slot * session.plan.global_batch


def save(session: Session, state: TrainerState) -> Path:
    path = save_checkpoint(
        session.output_dir,
        session.engine,
        session.peft_model,
        state,
        session.run_files,
        session.cfg.train.keep_last,
        is_main=session.rank == 0,
    )
    session.sink.print(f"saved {path}")
    return path


def step_flags(session: Session, nonfinite: torch.Tensor) -> tuple[bool, bool, bool]:
    """(stop requested, non-finite loss, unusable record under on_error=fail), each on any rank.

    One small all-reduce and the loop's one host sync per step: a signal, a NaN or a bad record may reach
    only some ranks, and every rank must take the same decision.
    """
    stop = 1.0 if session.stop is not None and session.stop.requested else 0.0
    device = nonfinite.device
    local = [torch.tensor(stop, device=device), nonfinite.float()]
    local.append(torch.tensor(float(len(session.failed_records)), device=device))
    stop_sum, bad_sum, failed = collectives.all_reduce_sum(torch.stack(local)).tolist()
    return stop_sum > 0, bad_sum > 0, failed > 0


def on_nonfinite(session: Session, state: TrainerState) -> None:
    """A NaN/inf loss this step: count the skipped update, or stop when it cannot be skipped or keeps coming."""
    step, limit = state.step, session.cfg.train.max_nonfinite_steps
    state.nonfinite_steps += 1
    session.nonfinite_in_a_row += 1
    if eng.step_applied(session.engine):
        raise TrainingError(
            f"step {step}: the loss was NaN/inf and the optimizer applied the update anyway (DeepSpeed "
            "skips such updates only when it computes the gradient norm: keep gradient_clipping > 0 and "
            "zero_optimization.compute_grad_norm on), so the weights may be corrupt and nothing was saved. "
            "Resume from the last checkpoint (`dstrain resume`) with a lower learning rate, or check the "
            "data around this step."
        )
    session.sink.print(f"[yellow]step {step}: non-finite loss or gradient, update skipped[/]")
    if session.nonfinite_in_a_row >= limit:
        raise TrainingError(
            f"step {step}: {session.nonfinite_in_a_row} optimizer steps in a row had a NaN/inf loss or "
            f"gradient (train.max_nonfinite_steps={limit}); training stopped. Lower the learning rate, "
            "enable gradient_clipping in the ZeRO JSON, or check the data; the last checkpoint is intact."
        )


def train(session: Session, state: TrainerState) -> TrainerState:
    """Run steps state.step+1 .. total_steps, logging, evaluating and saving on schedule.

    Stops early, with a checkpoint, when a rank was asked to stop (see `dstrain.distributed.stop`).
    """
    cfg, total = session.cfg.train, session.total_steps
    meter, since_log = StepMeter(), 0
    if state.step >= total:
        session.sink.print(
            f"nothing to train: the run is at step {state.step} of train.max_steps/epochs ({total} steps); "
            "raise it with --set train.max_steps=N"
        )
        return state
    if state.step == 0 and cfg.eval_every:
        run_eval(session, state)  # the starting point, so the eval curve shows what training changed
        meter.reset()
    eng.train_mode(session.engine)
    while state.step < total:
        for _ in range(session.plan.accumulation):
            micro_step(session, meter)
        stop, nonfinite, failed = step_flags(session, meter.take_nonfinite())
        advance_position(session, state)
        if failed:
            fail_on_bad_records(session, state.step)
        if nonfinite:
            on_nonfinite(session, state)
        else:
            session.nonfinite_in_a_row = 0
        since_log += 1
        session.sink.advance(state.step)
        # Save steps log too, so the checkpoint's token count is exact.
        if due(state.step, cfg.log_every, total) or due(state.step, cfg.save_every, total):
            log_train(session, state, meter, since_log)
            since_log = 0
        paused = time.perf_counter()
        if due(state.step, cfg.eval_every, total):
            run_eval(session, state)
        saved = due(state.step, cfg.save_every, total)
        if saved:
            save(session, state)
        meter.exclude(time.perf_counter() - paused)
        if state.step < total and stop:
            if not saved:
                if since_log:  # the token count in the checkpoint must include every step
                    log_train(session, state, meter, since_log)
                save(session, state)
            session.sink.print(
                f"stopped at step {state.step}; continue with `dstrain resume {session.output_dir}`"
            )
            break
    return state
