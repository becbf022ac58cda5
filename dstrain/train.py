"""`python -m dstrain.train`: the per-rank entry the deepspeed and torchrun launchers start.

deepspeed --num_gpus 2 --module dstrain.train --config RUN.yaml [--set k=v ...] [--ds-config zero3.json]
torchrun --nproc_per_node 2 -m dstrain.train --config RUN.yaml
deepspeed --num_gpus 2 --module dstrain.train --resume RUN_DIR_OR_CHECKPOINT [--set train.max_steps=200]

The run itself is `dstrain.training`: setup builds it, the loop trains it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from dstrain.config.run import RunConfig, load_config
from dstrain.errors import DstrainError

if TYPE_CHECKING:  # heavy imports (torch, deepspeed) stay out of `--help` and argument errors
    from dstrain.checkpoint.resume import ResumePoint
    from dstrain.checkpoint.state import TrainerState
    from dstrain.training.session import Run


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
    parser.add_argument("--version", action="store_true", help="print the dstrain version and exit")
    parser.add_argument("--verbose", action="store_true", help="with --version: the library versions too")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_config(config: str | None, overrides: list[str], ds_config: str | None) -> RunConfig:
    """The run config from a YAML, or the bundled demo when no YAML is given."""
    from dstrain.config.demo import demo_config

    extra = [f"ds_config={ds_config}"] if ds_config else []
    if config is None:
        return load_config(None, [*overrides, *extra], base=demo_config())
    return load_config(config, [*overrides, *extra])


def run(cfg: RunConfig, resume: ResumePoint | None = None) -> TrainerState:
    """Train to the end (or a requested stop), then plot (rank 0) and leave the process group."""
    from dstrain.distributed import stop as stopping

    owns_handler = stopping.current() is None  # called as a library: leave the signals as they were after
    try:
        return train_and_report(cfg, resume)
    finally:
        if owns_handler:
            stopping.uninstall()


def train_and_report(cfg: RunConfig, resume: ResumePoint | None) -> TrainerState:
    from dstrain.distributed import failures, heartbeat
    from dstrain.distributed import stop as stopping
    from dstrain.distributed.group import shutdown
    from dstrain.training.loop import fit
    from dstrain.training.setup import start

    try:
        wired, tally, state = start(cfg, resume)
        try:
            state = fit(wired, tally, state)
        except BaseException:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                wired.sink.close()
            raise
        finish(wired)
    except stopping.StopRequested as exc:
        # Said before the shutdown barrier, which every rank reaches (they agreed on the stop at the same
        # point): a launcher that kills the others when one rank exits cannot cut rank 0 off before it.
        failures.report_stop(exc)
        if exc.agreed:
            shutdown()
        elif watch := heartbeat.current():  # stopped alone: the others learn why instead of waiting
            watch.report(exc)
        raise
    except DstrainError:
        raise
    except Exception as exc:  # a broken collective: say which rank failed, or which timeout ran out
        if (known := failures.diagnose(exc, cfg.distributed)) is None:
            raise
        raise known from exc
    if wired.rank == 0:
        what = "done" if state.step >= wired.total_steps else "stopped early"
        wired.sink.print(f"{what}: {state.step} steps, {state.tokens:,} tokens; run dir {wired.output_dir}")
    shutdown()
    return state


def finish(wired: Run) -> None:
    """Rank 0 writes the loss plot (train.plot), hands it to the trackers (MLflow keeps it) and closes every
    sink. Agreed: a full disk at the very end fails every rank here, not in the shutdown barrier."""
    from dstrain.distributed.collectives import agreed

    with agreed("writing the loss plot and closing the metrics"):
        try:
            if wired.rank == 0 and wired.train.plot:
                from dstrain.metrics.plot import plot_run

                wired.sink.attach(plot_run(wired.output_dir))
        finally:
            wired.sink.close()


def configure(args: argparse.Namespace) -> tuple[RunConfig, ResumePoint | None]:
    """The run config (and the checkpoint to continue from, with --resume)."""
    if not args.resume:
        return resolve_config(args.config, args.overrides, args.ds_config), None
    from dstrain.checkpoint.resume import resume_config

    if args.config or args.ds_config:
        raise DstrainError("--resume takes the config from the checkpoint: drop --config/--ds-config")
    return resume_config(Path(args.resume), args.overrides)


def main(argv: list[str] | None = None) -> int:
    from dstrain.distributed import heartbeat, ranklog
    from dstrain.distributed import stop as stopping
    from dstrain.distributed.failures import report_crash, report_error
    from dstrain.model.quant import bitsandbytes_kept_out

    args = parse_args(argv)
    if args.version:
        from dstrain import version_text

        print(version_text(args.verbose))
        return 0
    stopping.install()  # first: a Ctrl-C while the config, the data or the model loads is not lost
    # Library deprecation chatter (transformers, torch.distributed) says nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        cfg, resume = configure(args)
        with bitsandbytes_kept_out(cfg.model.load_in_4bit):
            run(cfg, resume)
    except DstrainError as exc:
        if heartbeat.current():
            heartbeat.current().report(exc)
        return report_error(exc, args.debug)
    except stopping.StopRequested as exc:  # reported in run(), before the ranks leave the process group
        return exc.exit_code
    except KeyboardInterrupt as exc:  # a second Ctrl-C (or SIGTERM): the user, or Slurm, means it
        ranklog.error("interrupted again: stopped at once without saving; the last checkpoint is intact")
        return getattr(exc, "exit_code", 130)
    except Exception as exc:  # reported with its traceback; see report_crash
        return report_crash(exc)
    finally:
        stopping.uninstall()
        heartbeat.stop()
        ranklog.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
