"""Build a run from its config, in named parts: join the process group, build model and engine, restore or
start the state, open the batches and the metrics sinks. `start` reads top to bottom as the run begins."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstrain.checkpoint.state import TrainerState
from dstrain.config.run import RunConfig
from dstrain.config.zero import zero_stage
from dstrain.distributed.env import DistEnv
from dstrain.training import model_facts
from dstrain.training import restore as restoring
from dstrain.training.phases import StartupClock, phase
from dstrain.training.restore import agree_on_checkpoint, archive_newer_checkpoints, new_state, restore
from dstrain.training.rundir import space_warning
from dstrain.training.session import Run, Tally

if TYPE_CHECKING:
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from peft import PeftModel

    from dstrain.checkpoint.resume import ResumePoint
    from dstrain.data.batches import MicroBatch
    from dstrain.distributed.stop import StopRequest
    from dstrain.eval.generation import GenerationEval
    from dstrain.metrics.sinks import MetricsSink
    from dstrain.training.prepare import Prepared


def start(cfg: RunConfig, resume: ResumePoint | None = None) -> tuple[Run, Tally, TrainerState]:
    """Prepare on every rank, join the process group, build model, engine, loader and metrics sinks.

    With `resume`, the engine, RNG and data position continue from the checkpoint instead. A stop request
    during any of it ends the run at the end of that phase (training.phases), before anything is trained.
    """
    from dstrain import engine
    from dstrain.checkpoint.mixture_resume import check_resumed_data, resume_origin
    from dstrain.checkpoint.rng import seed_everything
    from dstrain.data.snapshot import plan as plan_snapshot
    from dstrain.distributed import stop as stopping
    from dstrain.training.prepare import prepare

    clock = StartupClock.since_process_start()
    clock.lap("imports")  # torch, deepspeed, transformers, peft: imported by the lines above
    stop = stopping.install()  # no-op when the entry point installed it first thing (as dstrain.train does)
    with phase(stop, "the config checks and the data index", collective=False):
        env = open_process(cfg)
        origin = resume_origin(cfg, resume) if resume else None
        prepared = prepare(cfg, env.world_size, resume.ds_source if resume else None, clock, origin=origin)
        if resume:
            check_resumed_data(resume, prepared)
        snapshot = plan_snapshot(cfg, resume.state.data_snapshot if resume else None)
    with phase(stop, "the rendezvous"):  # collective from here on: every rank stops at the same point
        env = join(cfg, env, resume, prepared, snapshot)
    clock.lap("rendezvous")
    # Same seed on every rank: LoRA's random init must agree (and match a 1-rank run of the same config).
    seed_everything(cfg.train.seed)
    with phase(stop, "the model and engine build"):
        initial = restoring.initial_adapter(resume, cfg)  # PiSSA/OLoRA resumed: the adapter it began with
        peft_model, ds_engine, memory_table = build(
            cfg, prepared, env, resume.optimizer if resume else None, clock, initial
        )
    # Then one seed per rank: dropout masks should differ across data-parallel ranks.
    seed_everything(cfg.train.seed + 1 + env.rank)
    with phase(stop, "the checkpoint restore"):
        state = new_state(env.world_size, prepared)
        if resume:
            state = restore(resume, ds_engine, peft_model, prepared, env.rank, env.world_size)
            clock.lap("restore")
        state.data_snapshot = snapshot
    sink = open_sink(cfg, prepared, env, state.step)
    sink.time_first_step(clock)
    try:
        announce(sink, cfg, prepared, peft_model, memory_table, resume, state)
        sink.print(f"optimizer: {engine.describe_optimizer(ds_engine)}")
        with phase(stop, "the reference log-prob pass"):
            run = wire(cfg, prepared, env, (ds_engine, peft_model), sink, state.step, stop)
    except BaseException:
        sink.close()  # a W&B run finished, the progress bar stopped, before the stop or error is said
        raise
    tally = Tally(
        index_bad=prepared.skipped,
        records_seen=len(prepared.train) + prepared.skipped,
        known_bad=set(state.bad_records),  # a resumed run goes on counting where its checkpoint stopped
        cleaned_records=prepared.train.corpus.num_cleaned,
    )
    return run, tally, state


def open_process(cfg: RunConfig) -> DistEnv:
    """This rank's launcher environment, its log file, and clean-ups that must precede any build."""
    from dstrain.distributed import buildlocks, ranklog
    from dstrain.distributed.env import read_env

    env = read_env()
    # An output_dir that cannot hold the rank logs is reported by prepare(), with every other config problem.
    with contextlib.suppress(OSError):
        ranklog.start(Path(cfg.output_dir), env.rank, env.world_size)
    buildlocks.use_install_cache()  # before any op loads: one JIT-op cache per DeepSpeed install
    if env.local_rank == 0:  # the build cache is per node; the other local ranks build only after rendezvous
        for verdict in buildlocks.clear_stale():
            print(f"warning: {verdict.note}", file=sys.stderr)
        if env.world_size > 1 and is_cpu():  # DeepSpeed's CPU collectives load their op at the rendezvous
            say_op_build("deepspeed_shm_comm")
    if cfg.data.num_workers:  # the tokenizer is used here before DataLoader workers fork from this process
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def is_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def join(
    cfg: RunConfig, env: DistEnv, resume: ResumePoint | None, prepared: Prepared, snapshot: dict[str, Any]
) -> DistEnv:
    """Rendezvous and process group, the failure watch, one checkpoint for all ranks, the run files (and the
    data snapshot when it is new)."""
    from dstrain.distributed import heartbeat
    from dstrain.distributed.collectives import agreed
    from dstrain.distributed.group import init_process_group
    from dstrain.training.rundir import start_run_dir

    timeouts, output_dir = cfg.distributed, Path(cfg.output_dir)
    env = init_process_group(env, timeouts.rendezvous_timeout_s, timeouts.collective_timeout_s)
    if env.is_distributed and timeouts.heartbeat_timeout_s:
        heartbeat.start(env, timeouts.heartbeat_timeout_s, output_dir)
    if resume:
        agree_on_checkpoint(resume)
    new_snapshot = bool(snapshot) and not (resume and resume.state.data_snapshot)
    with agreed("writing the run files"):  # rank 0 writes: a full disk there fails every rank at once
        if env.is_main:
            if resume:
                resume.notes.extend(archive_newer_checkpoints(resume.ckpt, output_dir))
            start_run_dir(cfg, prepared, snapshot, new_snapshot)
    return env


def build(
    cfg: RunConfig,
    prepared: Prepared,
    env: DistEnv,
    optimizer: str | None = None,
    clock: StartupClock | None = None,
    initial: dict[str, torch.Tensor] | None = None,
) -> tuple[PeftModel, DeepSpeedEngine, Any]:
    """The PEFT model, the memory check (before the engine allocates), and the DeepSpeed engine over it.

    `optimizer`: the Adam implementation a resumed run started with (dstrain.engine.choose_optimizer);
    `initial`: a resumed PiSSA/OLoRA run's initial adapter (training.restore.initial_adapter)."""
    clock = clock or StartupClock()
    from dstrain import engine
    from dstrain.distributed.collectives import agreed
    from dstrain.model import memory, variants
    from dstrain.model.build import build_model
    from dstrain.model.supervised import SupervisedLM

    groups = start_sequence_parallel(cfg)
    peft_model = build_model(cfg.model, cfg.lora, zero_stage(prepared.ds), prepared.ds, initial)
    with agreed("the memory check"):  # fail on every rank at once
        table = memory.check(cfg, prepared.ds, prepared.plan.micro, env.world_size, peft_model)
        if groups is not None:
            check_sequence_parallel(prepared.ds, peft_model, groups)
    clock.lap("model build")
    lm = SupervisedLM(
        peft_model, cfg.model.logits_chunk_tokens, cfg.model.head, cfg.model.router_aux_loss_coef, groups
    )
    implementation = engine.choose_optimizer(prepared.ds, optimizer)
    if env.local_rank == 0:  # the op is built once per node; the other local ranks wait for it silently
        say_op_build(engine.optimizer_op(prepared.ds, implementation))
    lr, ratio = prepared.ds["optimizer"]["params"]["lr"], cfg.lora.loraplus_lr_ratio
    params = variants.optimizer_groups(lm.named_parameters(), lr, ratio)  # LoRA+: two LR groups
    ds_engine = engine.create_engine(lm, prepared.ds, implementation, mpu=groups, param_groups=params)
    clock.lap("engine")
    return peft_model, ds_engine, table


def start_sequence_parallel(cfg: RunConfig) -> Any:
    """The sequence-parallel groups (a collective on every rank), None when train.sequence_parallel_size is 1."""
    from dstrain.distributed import sequence

    return sequence.start(cfg.train.sequence_parallel_size)


def check_sequence_parallel(ds: dict[str, Any], peft_model: PeftModel, groups: Any) -> None:
    """The ZeRO-3 bucket check, then the model switched to the Ulysses attention (model/ulysses.py)."""
    from dstrain.distributed import sequence
    from dstrain.model import ulysses

    sequence.check_bucket(ds, [p for p in peft_model.parameters() if p.requires_grad])
    ulysses.install(peft_model.get_base_model(), groups.get_sequence_parallel_group())


def data_rank(cfg: RunConfig, rank: int) -> int:
    """Which data-parallel share a rank reads: the ranks of one sequence-parallel group read the same."""
    return rank // cfg.train.sequence_parallel_size


def say_op_build(op: str | None) -> None:
    """Say that DeepSpeed is about to compile `op` (a first run on the machine), before the silent wait."""
    from dstrain.distributed.buildlocks import build_notice

    if op is not None and (notice := build_notice(op)):
        print(notice, flush=True)


def open_batches(cfg: RunConfig, prepared: Prepared, rank: int, start_step: int) -> Iterator[MicroBatch]:
    """This rank's micro batches from `start_step` on, read ahead by workers or a prefetch thread."""
    from dstrain.data.loader import LoaderOptions, train_loader
    from dstrain.data.prefetch import prefetched

    options = LoaderOptions.for_run(cfg, prepared.train, prepared.tokenizer.pad_token_id)
    if prepared.mixture is not None:
        from dataclasses import replace

        from dstrain.data.mixture_order import order_for_run

        order = order_for_run(prepared.mixture.plan, cfg.data, prepared.plan, prepared.train.corpus)
        options = replace(options, mixture=order)
    loader = train_loader(prepared.train, prepared.plan, options, rank, prepared.total_steps, start_step)
    return prefetched(loader, cfg.data.num_workers, cfg.data.prefetch)


def open_sink(cfg: RunConfig, prepared: Prepared, env: DistEnv, start_step: int) -> MetricsSink:
    from dstrain.config.run import config_to_dict
    from dstrain.distributed.collectives import agreed
    from dstrain.metrics.sinks import MetricsSink

    with agreed("opening the metrics sinks"):  # rank 0 opens them: its failure fails every rank at once
        return MetricsSink(
            Path(cfg.output_dir),
            prepared.total_steps,
            enabled=env.is_main,
            start_step=start_step,
            wandb_project=cfg.train.wandb_project,
            run_config=config_to_dict(cfg),
            mlflow=cfg.train.mlflow,
        )


def announce(
    sink: MetricsSink,
    cfg: RunConfig,
    prepared: Prepared,
    peft_model: torch.nn.Module,
    memory_table: Any,
    resume: ResumePoint | None,
    state: TrainerState,
) -> None:
    """Rank 0's start-up lines: warnings of the resume, what is trained, the memory estimate, where from."""
    for note in resume.notes if resume else []:
        sink.print(f"[yellow]warning:[/] {note}")
    from dstrain.data.kto import describe as kto_line
    from dstrain.objectives.normalize import describe as loss_line

    sink.print(describe(cfg, prepared, peft_model))
    if prepared.mixture is not None:
        sink.print(prepared.mixture.line(prepared.total_steps))
    sink.print(loss_line(cfg.objective.name, cfg.objective.loss_normalization))
    if prepared.train.kto:  # what KTO trains on: a preference file's pairs become two examples each
        sink.print(kto_line(cfg.data.format, len(prepared.train.corpus)))
    sink.print(model_facts.head_line(cfg, peft_model))
    if note := model_facts.router_note(cfg, peft_model):
        sink.print(f"[yellow]warning:[/] {note}")
    if memory_table is not None:
        sink.print(memory_table)
    if sink.enabled and (note := space_warning(cfg, prepared, peft_model, state.step)):
        sink.print(f"[yellow]warning:[/] {note}")
    if cfg.train.sequence_parallel_size > 1:
        sink.print(sequence_line(cfg, prepared))
    if resume:
        sink.print(
            f"resuming from {resume.ckpt} at step {state.step} (epoch {state.epoch}, sample {state.cursor})"
        )
        if resume.schedule_note:
            sink.print(resume.schedule_note)


def sequence_line(cfg: RunConfig, prepared: Prepared) -> str:
    size = cfg.train.sequence_parallel_size
    generation = (
        "; generation eval runs whole prompts on each rank with sdpa" if cfg.train.eval_generate else ""
    )
    return (
        f"sequence parallelism: {prepared.plan.world} group(s) of {size} ranks, each rank runs 1/{size} of "
        f"every sequence (Ulysses attention){generation}"
    )


def wire(
    cfg: RunConfig,
    prepared: Prepared,
    env: DistEnv,
    models: tuple[DeepSpeedEngine, PeftModel],
    sink: MetricsSink,
    start_step: int,
    stop: StopRequest,
) -> Run:
    """The Run the loop works with; the reference log-probs are computed here, before the first step."""
    from dstrain.checkpoint.save import RunFiles
    from dstrain.model.build import count_parameters

    ds_engine, peft_model = models

    batches = open_batches(cfg, prepared, data_rank(cfg, env.rank), start_step)
    reference = reference_table(cfg, prepared, env, ds_engine, sink)
    return Run(
        train=cfg.train,
        data=cfg.data,
        objective=cfg.objective,
        ds=prepared.ds,
        plan=prepared.plan,
        engine=ds_engine,
        peft_model=peft_model,
        batches=batches,
        eval_sets=prepared.eval,
        steps_per_epoch=prepared.steps_per_epoch,
        total_steps=prepared.total_steps,
        output_dir=Path(cfg.output_dir),
        run_files=RunFiles(prepared.config_yaml, prepared.ds, prepared.ds_source),
        pad_id=prepared.tokenizer.pad_token_id,
        rank=env.rank,
        sink=sink,
        stop=stop,
        num_params=count_parameters(peft_model)[1],
        generation=generation_eval(cfg, prepared, env.world_size),
        reference_table=reference,
        mixture=prepared.mixture,
        **model_facts.run_fields(cfg, peft_model),
    )


def reference_table(
    cfg: RunConfig, prepared: Prepared, env: DistEnv, ds_engine: DeepSpeedEngine, sink: MetricsSink
) -> torch.Tensor | None:
    if not cfg.objective.precompute_reference:
        return None
    from dstrain.eval.reference import reference_table as compute

    table, note = compute(
        cfg,
        ds_engine,
        prepared.train,
        prepared.plan.micro,
        data_rank(cfg, env.rank),
        prepared.plan.world,  # data-parallel ranks: a sequence-parallel group computes one share together
        prepared.tokenizer.pad_token_id,
        is_local_main=env.local_rank == 0,
    )
    sink.print(note)
    return table


def generation_eval(cfg: RunConfig, prepared: Prepared, world: int) -> GenerationEval | None:
    from dstrain.eval.generation import GenerationEval, generation_items

    if not (cfg.train.eval_generate and prepared.eval):
        return None
    limit, tokenizer = cfg.train.eval_generate, prepared.tokenizer
    sets = {s.name: generation_items(s.examples, tokenizer, limit) for s in prepared.eval}
    synced = zero_stage(prepared.ds) == 3 and world > 1
    return GenerationEval(tokenizer, sets, cfg.train.eval_max_new_tokens, synced)


def data_ranks(plan: Any) -> str:
    if plan.sequence == 1:
        return f"world {plan.world}"
    return f"{plan.world} data-parallel ranks (world {plan.devices} / sequence-parallel {plan.sequence})"


def describe(cfg: RunConfig, prepared: Prepared, peft_model: torch.nn.Module) -> str:
    from dstrain import __version__
    from dstrain.eval.sets import describe_sets
    from dstrain.model import variants
    from dstrain.model.build import count_parameters

    trainable, total = count_parameters(peft_model)
    plan = prepared.plan
    skipped = f", {prepared.skipped} bad records skipped" if prepared.skipped else ""
    cleaned = prepared.train.corpus.num_cleaned
    skipped += f", {cleaned} changed by cleaning (data.clean)" if cleaned else ""
    base = f" ({'4-bit NF4' if cfg.model.load_in_4bit else cfg.model.dtype} base)"
    return (
        f"dstrain: {cfg.model.path}{base} + {variants.describe(cfg.lora)} ({trainable:,} of {total:,} params trainable), "
        f"ZeRO-{zero_stage(prepared.ds)}, world {plan.devices}, global batch {plan.global_batch} = micro "
        f"{plan.micro} x accumulation {plan.accumulation} x {data_ranks(plan)}, {len(prepared.train)} train / "
        f"{describe_sets(prepared.eval)}, {prepared.total_steps} steps{skipped}; dstrain {__version__}"
    )
