"""The training loop: objective -> backward -> step -> metrics -> eval -> checkpoint. Short on purpose.

Each function takes the parts it needs: `Run` (what was built, immutable), `Tally` (counts this process
keeps) and `TrainerState` (what a checkpoint carries). The engine is only ever passed to `dstrain.engine`.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from pathlib import Path

import torch

from dstrain import engine as eng
from dstrain.checkpoint.save import save_checkpoint
from dstrain.checkpoint.state import TrainerState
from dstrain.config.metrics import higher_is_better
from dstrain.config.zero import BatchPlan
from dstrain.data.batches import MicroBatch
from dstrain.data.prefetch import paused
from dstrain.distributed.collectives import agreed, all_reduce_sum
from dstrain.distributed.sequence import rank_in_group
from dstrain.distributed.stop import EvalInterrupted
from dstrain.errors import TrainingError
from dstrain.eval.generation import evaluate_generation
from dstrain.eval.loss import evaluate_sets
from dstrain.metrics.device import device_stats, max_over_ranks, mfu
from dstrain.metrics.meter import StepMeter
from dstrain.model import selfcheck
from dstrain.model.ulysses import plain_attention
from dstrain.model.variants import group_lr_metrics
from dstrain.objectives.normalize import StepUnits
from dstrain.training.bad_records import (
    check_bad_fraction,
    count_skipped,
    fail_on_bad_records,
    note_bad_records,
)
from dstrain.training.objective import ReferencePoint, micro_loss, step_units
from dstrain.training.phases import halt_if_requested, stop_agreed
from dstrain.training.session import Run, Tally
from dstrain.training.sources import note_positions, source_row


def micro_step(
    run: Run,
    tally: Tally,
    meter: StepMeter,
    batch: MicroBatch,
    units: StepUnits | None,
    point: ReferencePoint | None = None,
) -> None:
    """One micro batch: forward, backward, and an optimizer step at the boundary (DeepSpeed decides).

    `units`: the step's global-batch denominators (objective.loss_normalization=global), None for the
    per-micro-batch mean; `point`: KTO's reference point and reference log-probs (training/objective.py)."""
    if not tally.head_checked:
        check_head(run, batch)
        tally.head_checked = True
    loss, logged, router = micro_loss(run, batch, meter, units, point)
    eng.backward(run.engine, loss + router)
    eng.step(run.engine)
    # the ranks of a sequence-parallel group share one micro batch: its first rank counts it
    counts = rank_in_group() == 0
    tokens, samples = (batch.tokens, batch.samples) if counts else (0, 0)
    if units is not None and not counts:
        logged = torch.zeros_like(logged)  # the group's first rank holds the group's share of the step loss
    meter.add(logged, tokens, samples, 0.0, skipped=len(batch.bad) if counts else 0)
    if run.moe:
        meter.add_router(router)
    if batch.bad:
        note_bad_records(run, tally, batch.bad)


def fetch_step(run: Run) -> tuple[list[MicroBatch], float]:
    """The micro batches of one optimizer step, read before its first forward, and the time spent waiting."""
    started = time.perf_counter()
    batches = [next(run.batches) for _ in range(run.plan.accumulation)]
    return batches, time.perf_counter() - started


def check_head(run: Run, batch: MicroBatch) -> None:
    """The first-batch self-check (model/selfcheck.py), on every rank, agreed before anyone trains."""
    key = selfcheck.layout(batch.inputs)
    if (run.head_exact and key is None) or run.param_dtype is None:
        return  # the run's path is the model's own forward on padded rows: nothing to compare
    with eng.evaluating(run.engine), torch.no_grad():
        head, rows, largest, count = eng.forward(run.engine, batch.inputs, check=True)
    # the mean over every rank's positions, against the largest logit seen anywhere: one verdict for all
    sums = torch.stack([head.double() * count, rows.double() * count, count.double()]).cpu()
    summed = all_reduce_sum(sums).tolist()
    largest = max_over_ranks({"logit": float(largest)})["logit"]
    positions = int(summed[2])
    head_mean, rows_mean = (total / positions if positions else 0.0 for total in summed[:2])
    selfcheck.verdict(head_mean, largest, positions, run.param_dtype, run.model_name)
    selfcheck.rows_verdict(rows_mean, largest, positions, run.param_dtype, run.model_name, key)


def due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def log_train(run: Run, tally: Tally, state: TrainerState, meter: StepMeter, steps: int) -> None:
    """Reduce the meter over ranks (the one host sync of a logged step) and write the row to every sink."""
    row = meter.collect(steps)
    state.tokens += row["tokens"]
    # the LR this step's update used, and the epoch its samples came from (state.epoch is the next step's)
    lr = tally.step_lrs[0] if tally.step_lrs else eng.current_lr(run.engine)
    row.update(step=state.step, lr=lr, epoch=max(0, state.step - 1) // run.steps_per_epoch)
    row.update(group_lr_metrics(tally.step_lrs))  # LoRA+: lr/lora_B, the B group's LR in this update
    row.update(max_over_ranks(device_stats()))  # a collective: every rank logs the same steps
    utilisation = mfu(row["tokens_per_s"], run.num_params, run.plan.devices)
    if utilisation is not None:
        row["mfu"] = utilisation
    row["tokens"] = state.tokens
    row["samples"] = state.samples
    if run.mixture is not None:
        row.update(source_row(run.mixture, state, row.pop("sources_now")))
    count_skipped(tally, state, row.pop("skipped_now"))  # a collective when some rank skipped a record
    row["skipped_records"], row["skipped_reads"] = tally.skipped_records, state.skipped_reads
    row["cleaned_records"] = tally.cleaned_records
    row["skipped_steps"] = state.nonfinite_steps
    norm = eng.grad_norm(run.engine)
    if norm is not None:
        row["grad_norm"] = norm
    write_row(run, dict(sorted(row.items(), key=lambda kv: kv[0] != "step")))
    meter.reset()
    check_bad_fraction(tally, run.data.max_bad_fraction)  # the same numbers on every rank: all raise, or none


def write_row(run: Run, row: dict) -> None:
    """Rank 0 writes the row to its sinks. Agreed (one more tiny all-reduce, on logged steps only): a write
    that fails there (a full disk) ends the run on every rank at this step, not in a collective's timeout."""
    with agreed("writing metrics"):
        run.sink.log(row)


def run_eval(run: Run, state: TrainerState) -> dict[str, float] | None:
    """Eval loss (and generation metrics) of every eval set on every rank; rank 0 logs them and the best
    metric follows."""
    if not run.eval_sets:
        return None
    plan = run.plan
    # Asked before each eval batch, a collective: all ranks cut the eval short at the same batch.
    interrupted = partial(stop_agreed, run.stop)
    result = evaluate_sets(
        run.engine,
        run.eval_sets,
        plan.micro,
        run.rank // plan.sequence,  # data-parallel rank: a sequence-parallel group evaluates one share
        plan.world,
        run.pad_id,
        run.objective,
        run.data.share_prompt,
        interrupted,
    )
    if run.generation:  # it uses the tokenizer, which the prefetch thread must not use meanwhile
        # whole prompts on every rank (unsharded sdpa under sequence parallelism): shared over all ranks
        with (
            eng.evaluating(run.engine),
            paused(run.batches),
            plain_attention(run.peft_model.get_base_model()),
        ):
            result |= evaluate_generation(
                run.peft_model, run.generation, plan.micro, run.rank, plan.devices, interrupted
            )
    write_row(run, {"step": state.step, **result})
    note_best(state, run.train.best_metric, result)
    return result


def note_best(state: TrainerState, name: str, result: dict[str, float]) -> None:
    value = -result[name] if higher_is_better(name) else result[name]  # stored so that lower is better
    if state.best_metric is None or value < state.best_metric:
        # best_checkpoint follows only if this step is saved (save() sets it): no stale "best" is protected.
        state.best_metric, state.best_step, state.best_checkpoint = value, state.step, None


def advance_position(state: TrainerState, plan: BatchPlan, steps_per_epoch: int) -> None:
    """One optimizer step done: the step count and the data position (world-size independent) move on."""
    state.step += 1
    state.samples = state.step * plan.global_batch
    state.epoch, slot = divmod(state.step, steps_per_epoch)
    state.cursor = slot * plan.global_batch


def save(run: Run, state: TrainerState) -> Path:
    if run.mixture is not None:  # each source's position at this step (its tokens: at the last log)
        note_positions(state.sources, run.mixture, state.step)
    path = save_checkpoint(
        run.output_dir,
        run.engine,
        run.peft_model,
        state,
        run.run_files,
        run.train.keep_last,
        is_main=run.rank == 0,
    )
    run.sink.print(f"saved {path}")
    return path


def step_flags(stop_requested: bool, nonfinite: torch.Tensor, failed_records: int) -> tuple[bool, bool, bool]:
    """(stop requested, non-finite loss, unusable record under on_error=fail), each on any rank.

    One small all-reduce and the loop's one host sync per step: a signal, a NaN or a bad record may reach
    only some ranks, and every rank must take the same decision.
    """
    device = nonfinite.device
    local = [torch.tensor(float(stop_requested), device=device), nonfinite.float()]
    local.append(torch.tensor(float(failed_records), device=device))
    stop_sum, bad_sum, failed = all_reduce_sum(torch.stack(local)).tolist()
    return stop_sum > 0, bad_sum > 0, failed > 0


def on_nonfinite(run: Run, tally: Tally, state: TrainerState) -> None:
    """A NaN/inf loss this step: count the skipped update, or stop when it cannot be skipped or keeps coming."""
    step, limit = state.step, run.train.max_nonfinite_steps
    state.nonfinite_steps += 1
    tally.nonfinite_in_a_row += 1
    if eng.step_applied(run.engine):
        raise TrainingError(
            f"step {step}: the loss was NaN/inf and the optimizer applied the update anyway (DeepSpeed "
            "skips such updates only when it computes the gradient norm: keep gradient_clipping > 0 and "
            "zero_optimization.compute_grad_norm on), so the weights may be corrupt and nothing was saved. "
            "Resume from the last checkpoint (`dstrain resume`) with a lower learning rate, or check the "
            "data around this step."
        )
    run.sink.print(f"[yellow]step {step}: non-finite loss or gradient, update skipped[/]")
    if tally.nonfinite_in_a_row >= limit:
        raise TrainingError(
            f"step {step}: {tally.nonfinite_in_a_row} optimizer steps in a row had a NaN/inf loss or "
            f"gradient (train.max_nonfinite_steps={limit}); training stopped. Lower the learning rate, "
            "enable gradient_clipping in the ZeRO JSON, or check the data; the last checkpoint is intact."
        )


def optimizer_step(run: Run, tally: Tally, state: TrainerState, meter: StepMeter) -> bool:
    """The micro batches of one optimizer step, then the cross-rank decisions on it; True if a stop was asked."""
    batches, waited = fetch_step(run)
    meter.wait(waited)
    units, points = step_units(run, batches)
    tally.step_lrs = eng.current_lrs(
        run.engine
    )  # what this step's update uses (the scheduler moves after it)
    for batch, point in zip(batches, points, strict=True):
        micro_step(run, tally, meter, batch, units, point)
    stop, nonfinite, failed = step_flags(
        run.stop.requested, meter.take_nonfinite(), len(tally.failed_records)
    )
    meter.end_step(nonfinite)
    advance_position(state, run.plan, run.steps_per_epoch)
    if failed:
        fail_on_bad_records(tally, run.output_dir, state.step)
    if nonfinite:
        on_nonfinite(run, tally, state)
    else:
        tally.nonfinite_in_a_row = 0
    return stop


def first_eval(run: Run, state: TrainerState) -> None:
    """The eval at step 0 (the curve's starting point). A stop during it ends the run: nothing trained yet."""
    run.stop.phase = "the step-0 eval"
    with contextlib.suppress(EvalInterrupted):
        run_eval(run, state)
    halt_if_requested(run.stop, "the step-0 eval")


def eval_and_save(run: Run, state: TrainerState, meter: StepMeter, stop: bool) -> tuple[bool, bool]:
    """This step's scheduled eval and save, timed out of the training throughput; returns (stop, saved).

    A stop requested during the eval cuts it short; one during the save lets it finish (it is atomic);
    either way every rank learns of it here and the run stops after this step, with a checkpoint.
    """
    cfg, total = run.train, run.total_steps
    paused_at = time.perf_counter()
    evaluated = due(state.step, cfg.eval_every, total)
    if evaluated:
        try:
            run_eval(run, state)
        except EvalInterrupted:
            stop = True
    saved = due(state.step, cfg.save_every, total)
    if saved:
        save(run, state)
    meter.exclude(time.perf_counter() - paused_at)
    if (evaluated or saved) and not stop and state.step < total:
        stop = stop_agreed(run.stop)  # a collective on eval and save steps only, like the eval itself
    return stop, saved


def fit(run: Run, tally: Tally, state: TrainerState) -> TrainerState:
    """Run steps state.step+1 .. total_steps, logging, evaluating and saving on schedule.

    Stops early, with a checkpoint, when a rank was asked to stop (see `dstrain.distributed.stop`).
    """
    cfg, total = run.train, run.total_steps
    sources = len(run.mixture.sources) if run.mixture is not None else 0
    meter, since_log = StepMeter(run.objective.loss_normalization == "global", sources), 0
    if state.step >= total:
        run.sink.print(
            f"nothing to train: the run is at step {state.step} of train.max_steps/epochs ({total} steps); "
            "raise it with --set train.max_steps=N"
        )
        return state
    if state.step == 0 and cfg.eval_every:
        first_eval(run, state)
        meter.reset()
    run.stop.phase = "training"  # from here a stop request saves a checkpoint after the step
    eng.train_mode(run.engine)
    while state.step < total:
        stop = optimizer_step(run, tally, state, meter)
        since_log += 1
        run.sink.advance(state.step)
        # Save steps log too, so the checkpoint's token count is exact.
        if due(state.step, cfg.log_every, total) or due(state.step, cfg.save_every, total):
            log_train(run, tally, state, meter, since_log)
            since_log = 0
        stop, saved = eval_and_save(run, state, meter, stop)
        if state.step < total and stop:
            if not saved:
                if since_log:  # the token count in the checkpoint must include every step
                    log_train(run, tally, state, meter, since_log)
                save(run, state)
            run.sink.print(f"stopped at step {state.step}; continue with `dstrain resume {run.output_dir}`")
            break
    return state
