"""The `dstrain` command. Each subcommand delegates; none holds logic of its own (the launcher is
`dstrain.distributed.launcher`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from dstrain.errors import DstrainError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="LoRA/QLoRA fine-tuning for RAG inside DeepSpeed ZeRO.",
)
DEBUG = {"on": False}
# Options shared by `train` and `resume`, which both start the run through `launch`.
NumGpus = Annotated[int | None, typer.Option("--num-gpus", help="start the deepspeed launcher")]
Hostfile = Annotated[Path | None, typer.Option("--hostfile", help="deepspeed hostfile (multi-node)")]


def fail(exc: DstrainError, code: int | None = None) -> None:
    if DEBUG["on"]:
        raise exc
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code if code is not None else exc.exit_code)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for user errors")] = False,
    version: Annotated[bool, typer.Option("--version", help="print the dstrain version and exit")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="with --version: torch, deepspeed, transformers, peft too")
    ] = False,
) -> None:
    DEBUG["on"] = debug
    if version:
        from dstrain import version_text

        typer.echo(version_text(verbose))
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:  # invoke_without_command is for --version only
        typer.echo(f"{ctx.get_usage()}\nTry 'dstrain --help' for help.\n\nerror: missing command", err=True)
        raise typer.Exit(2)


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Option("--config", help="run YAML; omit for the bundled demo")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE override (repeatable)")
    ] = None,
    ds_config: Annotated[
        str | None, typer.Option("--ds-config", help="ZeRO JSON (overrides the YAML)")
    ] = None,
    num_gpus: NumGpus = None,
    hostfile: Hostfile = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="plan the run (steps, LR, data, memory per rank); train nothing")
    ] = False,
    world_size: Annotated[
        int | None, typer.Option("--world-size", help="with --dry-run: plan for this many ranks")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="with --dry-run: print one JSON object")] = False,
) -> None:
    """Train. Without --config: the bundled demo (tiny model, sample RAG data, runs/demo/)."""
    if dry_run or world_size is not None or as_json:
        plan_run(config, overrides or [], ds_config, (num_gpus, hostfile, world_size), as_json, dry_run)
    args = (["--config", str(config)] if config else []) + set_args(overrides)
    args += ["--ds-config", ds_config] if ds_config else []
    launch(args, num_gpus, hostfile)


def plan_run(
    config: Path | None,
    overrides: list[str],
    ds_config: str | None,
    flags: tuple[int | None, Path | None, int | None],
    as_json: bool,
    dry_run: bool,
) -> None:
    from dstrain.training.dry_run import dry_run as plan

    if not dry_run:
        fail(
            DstrainError(
                "--world-size and --json go with --dry-run (a run's world size comes from the launcher)"
            )
        )
    try:
        raise typer.Exit(plan(config, overrides, ds_config, flags, as_json))
    except DstrainError as exc:
        fail(exc)


def set_args(overrides: list[str] | None) -> list[str]:
    return [arg for item in overrides or [] for arg in ("--set", item)]


def launch(
    args: list[str], num_gpus: int | None, hostfile: Path | None, module: str = "dstrain.train"
) -> None:
    """Run `python -m MODULE ARGS` in this process, or on every rank through the deepspeed launcher."""
    args = [*args, "--debug"] if DEBUG["on"] else args
    if num_gpus is not None or hostfile is not None:
        from dstrain.distributed.launcher import launcher_command, run_launcher

        cmd = launcher_command(num_gpus, hostfile, args, module)
        typer.echo(f"launching: {shlex.join(cmd)}", err=True)
        raise typer.Exit(run_launcher(cmd))
    import importlib

    raise typer.Exit(importlib.import_module(module).main(args))


@app.command()
def resume(
    path: Annotated[Path, typer.Argument(help="a run dir (its newest valid checkpoint) or a checkpoint dir")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE override of a non-structural key")
    ] = None,
    num_gpus: NumGpus = None,
    hostfile: Hostfile = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            "--schedule",
            help="keep | stretch: the LR schedule after a changed train.max_steps/epochs (default: stretch "
            "when the length changed); same as --set train.resume_schedule=...",
        ),
    ] = None,
) -> None:
    """Continue a run from its checkpoint, on the same or another number of ranks (same global batch)."""
    from dstrain.checkpoint.load import find_checkpoint

    try:
        found = find_checkpoint(path)
    except DstrainError as exc:
        fail(exc)
    for note in found.notes:
        typer.echo(f"warning: {note}", err=True)
    if schedule is not None:
        overrides = [*(overrides or []), f"train.resume_schedule={schedule}"]
    # Every rank gets the checkpoint chosen here, so all of them load the same one.
    launch(["--resume", str(found.path), *set_args(overrides)], num_gpus, hostfile)


@app.command("eval")
def evaluate(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="PATH", help="a run dir, checkpoint, exported adapter dir or merged model dir"
        ),
    ],
    data: Annotated[list[str], typer.Option("--data", help="eval file(s) or globs: --data a.jsonl b.jsonl")],
    format: Annotated[str | None, typer.Option("--format", help="preference | sft-rag | messages")] = None,
    generate: Annotated[int, typer.Option("--generate", help="greedy answers (EM/F1) for N records")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="report path (default: next to PATH)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="run YAML for an adapter/model dir")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE (repeatable)")] = None,
    num_gpus: NumGpus = None,
) -> None:
    """Score a checkpoint on eval data: eval_loss, preference accuracy/margin, EM/F1 with --generate."""
    # `--data a b` leaves b among the positional arguments: every one after PATH is another data file
    args = [paths[0], "--data", *data, *paths[1:], *set_args(overrides)]
    args += (["--format", format] if format else []) + (["--generate", str(generate)] if generate else [])
    args += (["--json"] if as_json else []) + (["--out", str(out)] if out else [])
    args += ["--config", str(config)] if config else []
    launch(args, num_gpus, None, module="dstrain.eval.command")


@app.command()
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="a checkpoint dir (or a run dir: its newest checkpoint)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Show a checkpoint's step, tokens, world size, config digest and files; verify every file."""
    from dstrain.checkpoint.report import inspect_checkpoint

    try:
        code = inspect_checkpoint(ckpt, as_json)
    except DstrainError as exc:
        fail(exc)
    raise typer.Exit(code)


@app.command()
def export(
    ckpt: Annotated[
        Path, typer.Argument(help="a checkpoint dir (or a run dir: its newest valid checkpoint)")
    ],
    out: Annotated[Path, typer.Option("--out", help="new directory to write")],
    merge: Annotated[
        bool, typer.Option("--merge", help="fold LoRA into the base: a full HF model dir in safetensors")
    ] = False,
) -> None:
    """Write a PEFT adapter dir, or with --merge a full model that AutoModelForCausalLM loads."""
    from dstrain.checkpoint.export import export_checkpoint

    try:
        used, notes = export_checkpoint(ckpt, out, merge)
    except DstrainError as exc:
        fail(exc)
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    what = "merged model" if merge else "adapter"
    typer.echo(f"exported {what} from {used} to {out}")


@app.command("validate-data")
def validate_data(
    path: Annotated[Path | None, typer.Argument(help="JSONL, JSON array or Parquet file to check")] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="preference | sft-rag | messages | kto")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="check every training file of this run config, per source")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE override of the config")
    ] = None,
    world_size: Annotated[
        int, typer.Option("--world-size", help="with --config: ranks for the global batch (expected passes)")
    ] = 1,
) -> None:
    """Check every record; print PATH:LINE: reason per problem and a summary. Exit 1 on any problem.

    With --config: the run's training files, each in its source's format, with per-source counts and each
    source's expected passes over the run. Large JSONL files are checked in parallel byte ranges, and the
    result is the index a training run on the unchanged file then reuses (so a clean file is not validated
    twice).
    """
    from dstrain.config.sources import FORMATS
    from dstrain.data.validate import validate_config, validate_file

    try:
        if config is not None:
            raise typer.Exit(validate_config(config, overrides or [], world_size, typer.echo))
        if path is None or format is None:
            raise DstrainError(
                "give a file and its format (validate-data PATH --format F), or --config RUN.yaml"
            )
        if format not in FORMATS:
            raise DstrainError(f"--format must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got {format!r}")
        if not path.is_file():
            why = (
                "a directory; pass one JSONL or Parquet file (or a JSON array)"
                if path.is_dir()
                else "no such file"
            )
            raise DstrainError(f"{path}: {why}")
        raise typer.Exit(validate_file(path, format, typer.echo))
    except DstrainError as exc:
        fail(exc, code=1)


@app.command()
def convert(
    sources: Annotated[list[Path], typer.Argument(help="upstream files: JSONL or a JSON array")],
    to: Annotated[str, typer.Option("--to", help="preference | sft-rag | messages | kto")],
    out: Annotated[Path, typer.Option("--out", help="the JSONL file to write (appears only when complete)")],
    from_: Annotated[
        str,
        typer.Option("--from", help="ddr | ddr-sft | kbalign | rageval | raft | alpaca | sharegpt | auto"),
    ] = "auto",
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 if any record was dropped")] = False,
    pick_by: Annotated[
        str | None, typer.Option("--pick-by", help="ddr: re-pick chosen/rejected from context by this score")
    ] = None,
    min_margin: Annotated[
        float | None, typer.Option("--min-margin", help="ddr: drop pairs whose score margin is below this")
    ] = None,
    strip_wrapper: Annotated[
        bool, typer.Option("--strip-wrapper", help="kbalign: drop the 'User: ... Assistant: ' wrapper")
    ] = False,
    final_answer: Annotated[
        bool, typer.Option("--final-answer", help="raft: the answer after <ANSWER>: only, not the whole CoT")
    ] = False,
    passages_from: Annotated[
        str | None, typer.Option("--passages-from", help="rageval: prediction | ground_truth")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="ddr -> kto: answers scoring at least this are desirable (0.5)"),
    ] = None,
) -> None:
    """Convert upstream RAG data (DDR, KBAlign, RAGEval, RAFT, Alpaca, ShareGPT) to a dstrain format.

    Prints SRC:LINE: reason for each record left out, then a summary. Exit 0 when something was written.
    """
    from dstrain.data.convert.pipeline import convert_command
    from dstrain.data.convert.registry import Options

    opts = Options(pick_by, min_margin, strip_wrapper, final_answer, passages_from, threshold)
    try:
        code = convert_command(sources, from_, to, out, strict, opts)
    except DstrainError as exc:
        fail(exc, code=1)
    raise typer.Exit(code)


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="a run's output_dir")]) -> None:
    """Write loss / eval / throughput curves of a run as RUN_DIR/loss.png."""
    from dstrain.metrics.plot import plot_run

    try:
        typer.echo(str(plot_run(run_dir)))
    except DstrainError as exc:
        fail(exc)


def main() -> None:
    try:
        app()
    except DstrainError as exc:  # raised past `fail` only with --debug: the traceback is wanted then
        if not DEBUG["on"]:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
