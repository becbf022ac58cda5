"""`python -m dstrain.train`: the per-rank entry the deepspeed and torchrun launchers start.

deepspeed --num_gpus 2 --module dstrain.train --config RUN.yaml [--set k=v ...] [--ds-config zero3.json]
torchrun --nproc_per_node 2 -m dstrain.train --config RUN.yaml
deepspeed --num_gpus 2 --module dstrain.train --resume RUN_DIR_OR_CHECKPOINT [--set train.max_steps=200]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from dstrain.checkpoint.state import TrainerState
from dstrain.config.run import RunConfig, load_config
from dstrain.config.zero import zero_stage
from dstrain.errors import DstrainError

if TYPE_CHECKING:  # heavy imports (torch, deepspeed) stay out of `--help` and argument errors
    import torch

    from dstrain.checkpoint.resume import ResumePoint
    from dstrain.eval.generation import GenerationEval
    from dstrain.training.loop import Session
    from dstrain.training.prepare import Prepared

# Versions recorded in every checkpoint: what produced the weights matters when they stop loading.
TRACKED_PACKAGES = ("dstrain", "torch", "deepspeed", "transformers", "peft", "safetensors")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dstrain.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="run YAML (omit for the bundled demo)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config key, e.g. --set train.max_steps=100 (repeatable)",
    )
    parser.add_argument("--ds-config", help="ZeRO JSON; overrides ds_config in the run YAML")
    parser.add_argument(
        "--resume", metavar="PATH", help="continue from a run dir (newest valid checkpoint) or a checkpoint"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_config(config: str | None, overrides: list[str], ds_config: str | None) -> RunConfig:
    """The run config from a YAML, or the bundled demo when no YAML is given."""
    from dstrain.config.demo import demo_config

    extra = [f"ds_config={ds_config}"] if ds_config else []
    if config is None:
        return load_config(None, [*overrides, *extra], base=demo_config())
    return load_config(config, [*overrides, *extra])


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def write_run_files(output_dir: Path, config_yaml: str, ds: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    (output_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")


def start(cfg: RunConfig, resume: ResumePoint | None = None) -> tuple[Session, TrainerState]:
    """Prepare on every rank, join the process group, build model, engine, loader and metrics sinks.

    With `resume`, the engine, RNG and data position continue from the checkpoint instead.
    """
    from dstrain import engine
    from dstrain.checkpoint.resume import check_same_data
    from dstrain.checkpoint.rng import seed_everything
    from dstrain.checkpoint.save import RunFiles
    from dstrain.config.run import config_to_dict
    from dstrain.data.loader import train_loader
    from dstrain.data.prefetch import prefetched
    from dstrain.distributed import buildlocks, collectives, env, group, heartbeat, ranklog
    from dstrain.distributed.stop import StopRequest
    from dstrain.metrics.meter import MetricsSink
    from dstrain.model import memory
    from dstrain.model.build import build_model, count_parameters
    from dstrain.model.supervised import SupervisedLM
    from dstrain.training.loop import Session
    from dstrain.training.prepare import prepare

    env = env.read_env()
    output_dir = Path(cfg.output_dir)
    # An output_dir that cannot hold the rank logs is reported by prepare(), with every other config problem.
    with contextlib.suppress(OSError):
        ranklog.start(output_dir, env.rank, env.world_size)
    if env.local_rank == 0:  # the build cache is per node; the other local ranks build only after rendezvous
        for verdict in buildlocks.clear_stale():
            print(f"warning: {verdict.note}", file=sys.stderr)
    if cfg.data.num_workers:  # the tokenizer is used here before DataLoader workers fork from this process
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prepared = prepare(cfg, env.world_size, resume.ds_source if resume else None)
    if resume:
        check_same_data(resume.state, len(prepared.train))
    timeouts = cfg.distributed
    env = group.init_process_group(env, timeouts.rendezvous_timeout_s, timeouts.collective_timeout_s)
    if env.is_distributed and timeouts.heartbeat_timeout_s:
        heartbeat.start(env, timeouts.heartbeat_timeout_s, output_dir)
    if resume:
        agree_on_checkpoint(resume)
        if env.is_main:
            for note in archive_newer_checkpoints(resume.ckpt, output_dir):
                resume.notes.append(note)
        collectives.barrier()
    if env.is_main:
        write_run_files(output_dir, prepared.config_yaml, prepared.ds)
    # Same seed on every rank: LoRA's random init must agree (and match a 1-rank run of the same config).
    seed_everything(cfg.train.seed)
    peft_model = build_model(cfg.model, cfg.lora, zero_stage(prepared.ds), prepared.ds)
    with collectives.agreed("the memory check"):  # before the engine allocates: fail on every rank at once
        memory_table = memory.check(cfg, prepared.ds, prepared.plan.micro, env.world_size, peft_model)
    ds_engine = engine.create_engine(SupervisedLM(peft_model, cfg.model.logits_chunk_tokens), prepared.ds)
    # Then one seed per rank: dropout masks should differ across data-parallel ranks.
    seed_everything(cfg.train.seed + 1 + env.rank)
    state = new_state(env.world_size, prepared)
    if resume:
        state = restore(resume, ds_engine, peft_model, prepared, env.rank, env.world_size)
    flash = cfg.model.attn_implementation == "flash_attention_2"
    loader = train_loader(
        prepared.train,
        prepared.plan,
        env.rank,
        cfg.data.seed,
        prepared.total_steps,
        prepared.tokenizer.pad_token_id,
        cfg.data.num_workers,
        start_step=state.step,
        pack_to=cfg.data.max_seq_len if cfg.data.packing and not flash else 0,
        flat=cfg.data.packing and flash,  # flash-attention packs without a mask: variable-length rows
        shuffle=(cfg.data.shuffle_block, cfg.data.shuffle_window),
        pairs=prepared.train.pairs,
        group=(prepared.train.sizes(), cfg.data.length_group_window) if cfg.data.group_by_length else None,
        share_prompt=cfg.data.share_prompt,
    )
    sink = MetricsSink(
        output_dir,
        prepared.total_steps,
        enabled=env.is_main,
        start_step=state.step,
        wandb_project=cfg.train.wandb_project,
        run_config=config_to_dict(cfg),
    )
    for note in resume.notes if resume else []:
        sink.print(f"[yellow]warning:[/] {note}")
    sink.print(describe(cfg, prepared, peft_model))
    if memory_table is not None:
        sink.print(memory_table)
    if resume:
        sink.print(
            f"resuming from {resume.ckpt} at step {state.step} (epoch {state.epoch}, sample {state.cursor})"
        )
    session = Session(
        cfg=cfg,
        ds=prepared.ds,
        plan=prepared.plan,
        engine=ds_engine,
        peft_model=peft_model,
        batches=prefetched(loader, cfg.data.num_workers, cfg.data.prefetch),
        eval_examples=prepared.eval,
        steps_per_epoch=prepared.steps_per_epoch,
        total_steps=prepared.total_steps,
        output_dir=output_dir,
        run_files=RunFiles(prepared.config_yaml, prepared.ds, prepared.ds_source),
        pad_id=prepared.tokenizer.pad_token_id,
        rank=env.rank,
        sink=sink,
        skipped_records=prepared.skipped,
        records_seen=len(prepared.train) + prepared.skipped,
        stop=StopRequest().install(),
        num_params=count_parameters(peft_model)[1],
        generation=generation_eval(cfg, prepared, env.world_size),
    )
    if cfg.objective.precompute_reference:
        from dstrain.eval.reference import reference_table

        session.reference_table, note = reference_table(
            cfg,
            ds_engine,
            prepared.train,
            prepared.plan.micro,
            env.rank,
            env.world_size,
            prepared.tokenizer.pad_token_id,
            is_local_main=env.local_rank == 0,
        )
        sink.print(note)
    return session, state


def generation_eval(cfg: RunConfig, prepared: Prepared, world: int) -> GenerationEval | None:
    from dstrain.eval.generation import GenerationEval, generation_items

    if not (cfg.train.eval_generate and prepared.eval):
        return None
    items = generation_items(prepared.eval, prepared.tokenizer, cfg.train.eval_generate)
    synced = zero_stage(prepared.ds) == 3 and world > 1
    return GenerationEval(prepared.tokenizer, items, cfg.train.eval_max_new_tokens, synced)


def agree_on_checkpoint(resume: ResumePoint) -> None:
    """Every rank must continue from the same checkpoint (each resolved PATH on its own)."""
    from dstrain.distributed import collectives
    from dstrain.errors import DistributedError

    chosen = {blob.decode() for blob in collectives.all_gather_bytes(str(resume.ckpt.resolve()).encode())}
    if len(chosen) > 1:
        raise DistributedError(
            f"ranks chose different checkpoints to resume from ({', '.join(sorted(chosen))}): pass one "
            "checkpoint dir, or use `dstrain resume`, which picks it once for all ranks"
        )


def archive_newer_checkpoints(ckpt: Path, output_dir: Path) -> list[str]:
    """Resuming an older checkpoint of the same run rolls the run back: the newer checkpoints belong to the
    abandoned timeline, so they move to checkpoints/abandoned/ (never deleted), out of `latest`'s reach."""
    import time

    from dstrain.checkpoint import layout

    root = layout.checkpoints_dir(output_dir)
    if ckpt.parent.resolve() != root.resolve():
        return []
    newer = [p for p in layout.list_checkpoints(root) if p.name > ckpt.name]
    if not newer:
        return []
    aside = root / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for path in newer:
        path.rename(aside / path.name)
    layout.write_latest(root, ckpt.name)
    return [f"rolled back to {ckpt.name}: moved {', '.join(p.name for p in newer)} to {aside}"]


def new_state(world_size: int, prepared: Prepared) -> TrainerState:
    return TrainerState(
        world_size=world_size,
        global_batch=prepared.plan.global_batch,
        train_samples=len(prepared.train),
        config_digest=prepared.config_digest,
        versions=versions(),
    )


def restore(
    resume: ResumePoint, ds_engine: object, peft_model: object, prepared: Prepared, rank: int, world: int
) -> TrainerState:
    """Load optimizer, scheduler and RNG state into the new engine (a collective) and continue the state."""
    from dataclasses import replace

    from dstrain.checkpoint import load, optim
    from dstrain.checkpoint.rng import restore_rng, seed_everything
    from dstrain.distributed import collectives

    saved = resume.state
    with collectives.agreed(f"reading {resume.ckpt}"):  # before any collective: no rank left waiting
        tensors, sched = load.read_optimizer(resume.ckpt)
        rng = load.read_rng(resume.ckpt, rank) if world == saved.world_size else None
    optim.restore_optimizer_state(
        ds_engine, peft_model, tensors, sched, prepared.plan.accumulation, prepared.tokenizer.pad_token_id
    )
    if rng is not None:
        restore_rng(*rng)
    else:  # another world size: rank r's stream has no saved counterpart; derive one from seed and step
        seed_everything(prepared.cfg.train.seed + 1 + rank + 1_000_003 * saved.step)
    return replace(saved, world_size=world, config_digest=prepared.config_digest, versions=versions())


def describe(cfg: RunConfig, prepared: Prepared, peft_model: torch.nn.Module) -> str:
    from dstrain.model.build import count_parameters

    trainable, total = count_parameters(peft_model)
    plan = prepared.plan
    skipped = f", {prepared.skipped} bad records skipped" if prepared.skipped else ""
    base = f" ({'4-bit NF4' if cfg.model.load_in_4bit else cfg.model.dtype} base)"
    return (
        f"dstrain: {cfg.model.path}{base} + LoRA r={cfg.lora.r} ({trainable:,} of {total:,} params trainable), "
        f"ZeRO-{zero_stage(prepared.ds)}, world {plan.world}, global batch {plan.global_batch} = micro "
        f"{plan.micro} x accumulation {plan.accumulation} x world {plan.world}, {len(prepared.train)} train / "
        f"{len(prepared.eval)} eval samples, {prepared.total_steps} steps{skipped}"
    )


def run(cfg: RunConfig, resume: ResumePoint | None = None) -> TrainerState:
    """Train to the end (or a requested stop), then plot (rank 0) and leave the process group."""
    from dstrain.distributed import failures, group
    from dstrain.training.loop import train

    try:
        session, state = start(cfg, resume)
        try:
            state = train(session, state)
        finally:
            session.sink.close()
            session.stop.uninstall()
    except DstrainError:
        raise
    except Exception as exc:  # a broken collective: say which rank failed, or which timeout ran out
        if (known := failures.diagnose(exc, cfg.distributed)) is None:
            raise
        raise known from exc
    if session.rank == 0:
        from dstrain.metrics.plot import plot_run

        plot_run(session.output_dir)
        what = "done" if state.step >= session.total_steps else "stopped early"
        session.sink.print(
            f"{what}: {state.step} steps, {state.tokens:,} tokens; run dir {session.output_dir}"
        )
    group.shutdown()
    return state


def main(argv: list[str] | None = None) -> int:
    from dstrain.distributed import heartbeat, ranklog
    from dstrain.distributed.failures import report_crash, report_error

    args = parse_args(argv)
    # Library deprecation chatter (transformers, torch.distributed) says nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.resume:
            from dstrain.checkpoint.resume import resume_config

            if args.config or args.ds_config:
                raise DstrainError("--resume takes the config from the checkpoint: drop --config/--ds-config")
            run(*resume_config(Path(args.resume), args.overrides))
        else:
            run(resolve_config(args.config, args.overrides, args.ds_config))
    except DstrainError as exc:
        if heartbeat.current():
            heartbeat.current().report(exc)
        return report_error(exc, args.debug)
    except KeyboardInterrupt:
        ranklog.error("interrupted")
        return 130
    except Exception as exc:  # reported with its traceback; see report_crash
        return report_crash(exc)
    finally:
        heartbeat.stop()
        ranklog.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
