"""The `dstrain` command. Each subcommand delegates; none holds logic of its own (the launcher is
`dstrain.distributed.launcher`)."""

from __future__ import annotations

import shlex
import shutil
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
) -> None:
    """Train. Without --config: the bundled demo (tiny model, sample RAG data, runs/demo/)."""
    args = (["--config", str(config)] if config else []) + set_args(overrides)
    args += ["--ds-config", ds_config] if ds_config else []
    launch(args, num_gpus, hostfile)


def set_args(overrides: list[str] | None) -> list[str]:
    return [arg for item in overrides or [] for arg in ("--set", item)]


def launch(args: list[str], num_gpus: int | None, hostfile: Path | None) -> None:
    """Run `python -m dstrain.train ARGS` in this process, or on every rank through the deepspeed launcher."""
    args = [*args, "--debug"] if DEBUG["on"] else args
    if num_gpus is not None or hostfile is not None:
        from dstrain.distributed.launcher import launcher_command, run_launcher

        cmd = launcher_command(num_gpus, hostfile, args)
        if shutil.which(cmd[0]) is None:
            fail(
                DstrainError(
                    "the `deepspeed` launcher is not on PATH; activate the environment dstrain is in"
                )
            )
        typer.echo(f"launching: {shlex.join(cmd)}", err=True)
        raise typer.Exit(run_launcher(cmd))
    from dstrain.train import main as train_main

    raise typer.Exit(train_main(args))


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
    path: Annotated[Path, typer.Argument(help="JSONL, JSON array or Parquet file to check")],
    format: Annotated[str, typer.Option("--format", help="preference | sft-rag | messages | kto")],
) -> None:
    """Check every record; print PATH:LINE: reason per problem and a summary. Exit 1 on any problem.

    Large JSONL files are checked in parallel byte ranges, and the result is the index a training run on
    the unchanged file then reuses (so a clean file is not validated twice).
    """
    from dstrain.data.index import index_file, iter_bad
    from dstrain.data.records import FORMATS

    if format not in FORMATS:
        fail(DstrainError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}"), code=1)
    if not path.is_file():
        why = (
            "a directory; pass one JSONL or Parquet file (or a JSON array)"
            if path.is_dir()
            else "no such file"
        )
        fail(DstrainError(f"{path}: {why}"), code=1)
    try:
        index = index_file(path, format)
    except DstrainError as exc:
        fail(exc, code=1)
    for bad in iter_bad(index):
        typer.echo(str(bad))
    good, bad = len(index), index.num_bad
    cleaned = f", {index.num_cleaned} changed by cleaning (data.clean)" if index.num_cleaned else ""
    typer.echo(f"{path}: {good + bad} records, {good} ok, {bad} bad{cleaned}")
    if good + bad == 0:
        typer.echo(f"{path}: the file holds no records (empty or only blank lines)")
    raise typer.Exit(1 if bad or good == 0 else 0)


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
