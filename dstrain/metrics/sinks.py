"""Where logged rows go (rank 0 only): metrics.jsonl, TensorBoard under tb/, W&B and MLflow when asked, and
the console.

One small class per backend behind the `Sink` protocol; `MetricsSink` fans each row out to them. Adding a
backend is one class here and one line in `build_sinks`. A write into the run dir that fails for lack of
space or permission stops the run with one message (`dstrain.storage`): the disk that cannot take a metrics
row will not take the next checkpoint either. A tracking server (W&B, MLflow) that fails mid-run is a
warning: the run dir still gets every row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dstrain import storage
from dstrain.checkpoint.atomic import write_text_atomic

if TYPE_CHECKING:
    from dstrain.config.run import MlflowConfig
    from dstrain.training.phases import StartupClock

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class Sink(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def attach(self, path: Path) -> None:
        """A file of the run to keep with its metrics (the loss plot, at the end)."""

    def close(self) -> None: ...


def keep_rows_up_to(path: Path, step: int) -> None:
    """Drop rows a killed run logged after the checkpoint being resumed: they are about to be redone."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


class JsonlSink:
    """metrics.jsonl: one JSON object per row, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path: Path, start_step: int = 0) -> None:
        self.path, self.place = path, storage.run_place(path.parent)
        with storage.guard(self.place, "metrics", path):
            # A fresh run starts the file over; a run continuing from a checkpoint keeps the rows up to it.
            if start_step:
                keep_rows_up_to(path, start_step)
            self.file = path.open("a" if start_step else "w", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        with storage.guard(self.place, "metrics", self.path, len(line)):
            self.file.write(line)
            self.file.flush()

    def attach(self, path: Path) -> None:
        pass

    def close(self) -> None:
        with storage.guard(self.place, "metrics", self.path):
            self.file.close()  # closes the descriptor even when the last flush fails


def tb_tag(key: str) -> str:
    """`eval_loss` -> `eval/loss`, a named eval set's `eval_loss/rag` -> `eval/loss/rag`, `startup_engine_s`
    -> `startup/engine_s`; every other key under `train/`."""
    for prefix in ("eval", "startup"):
        if key.startswith(f"{prefix}_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return f"train/{key}"


class TensorBoardSink:
    """Each numeric value of a row as a scalar at the row's step."""

    def __init__(self, log_dir: Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where a sink is built

        # TensorBoard writes in a thread of its own; a failed write surfaces at the next call, guarded too.
        self.log_dir, self.place = log_dir, storage.run_place(log_dir.parent)
        with storage.guard(self.place, "TensorBoard events", log_dir):
            # purge_step hides events a killed run logged after its last checkpoint, as JsonlSink drops rows.
            self.writer = SummaryWriter(
                log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None
            )

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        with storage.guard(self.place, "TensorBoard events", self.log_dir):
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(tb_tag(key), value, step)

    def attach(self, path: Path) -> None:
        pass

    def close(self) -> None:
        with storage.guard(self.place, "TensorBoard events", self.log_dir):
            self.writer.close()


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run per run dir (from its absolute path), so a resumed run continues the same one."""
    return "".join(c if c.isalnum() else "-" for c in str(run_dir.resolve()))[-64:]


class WandbSink:
    """A W&B run; wandb is imported here only, so runs without a project never load it."""

    def __init__(self, run_dir: Path, project: str, run_config: dict[str, Any] | None = None) -> None:
        import wandb  # checked installed in preflight

        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=wandb_run_id(run_dir),
            resume="allow",
            dir=str(run_dir),
            config=run_config or {},
        )

    def log(self, row: dict[str, Any]) -> None:
        values = {k: v for k, v in row.items() if k != "step" and v is not None}
        self.run.log(values, step=int(row["step"]))

    def attach(self, path: Path) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def make_console() -> Console:
    # Into a log file (not a terminal) lines stay whole: a path cut at column 80 cannot be grepped.
    return Console(stderr=False, soft_wrap=not sys.stdout.isatty())


class ConsoleSink:
    """A rich progress bar with ETA and the latest loss, plus a line per eval and whatever is printed."""

    def __init__(self, console: Console, total_steps: int, start_step: int = 0) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self.progress.start()

    def log(self, row: dict[str, Any]) -> None:
        if row.get("loss") is not None:
            info = f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, info=info)
        if "eval_loss" in row:
            named = [
                f"{key[len('eval_loss/') :]} {value:.4f}"
                for key, value in row.items()
                if key.startswith("eval_loss/")
            ]
            by_set = f" ({', '.join(named)})" if named else ""
            self.console.print(f"step {int(row['step'])}: eval_loss {row['eval_loss']:.4f}{by_set}")

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def attach(self, path: Path) -> None:
        pass

    def print(self, message: RenderableType) -> None:
        self.console.print(message)

    def close(self) -> None:
        self.progress.stop()


def build_sinks(
    run_dir: Path,
    total_steps: int,
    start_step: int,
    wandb_project: str,
    run_config: dict[str, Any] | None,
    mlflow: MlflowConfig | None = None,
) -> tuple[list[Sink], ConsoleSink]:
    """Every backend of a run dir, in the order rows reach them; the console also serves `print`."""
    # Trackers first: a failing init (login, network) stops the run before metrics.jsonl is touched.
    wandb = WandbSink(run_dir, wandb_project, run_config) if wandb_project else None
    tracker = None
    if mlflow is not None and mlflow.enabled:
        from dstrain.metrics.tracking import MlflowSink

        tracker = MlflowSink(run_dir, mlflow, run_config, resumed=start_step > 0)
    with storage.guard(storage.run_place(run_dir), "the run dir", run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    jsonl = JsonlSink(run_dir / METRICS_FILE, start_step)
    tensorboard = TensorBoardSink(run_dir / TB_DIR, start_step)
    console = ConsoleSink(make_console(), total_steps, start_step)
    trackers: list[Sink] = [t for t in (wandb, tracker) if t is not None]
    sinks: list[Sink] = [jsonl, *trackers, tensorboard, console]
    return sinks, console


class MetricsSink:
    """metrics.jsonl + TensorBoard + W&B (with a project) + console; a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        enabled: bool,
        start_step: int = 0,
        wandb_project: str = "",
        run_config: dict[str, Any] | None = None,
        mlflow: MlflowConfig | None = None,
    ) -> None:
        self.enabled = enabled
        self.sinks: list[Sink] = []
        self.console: ConsoleSink | None = None
        self.startup: StartupClock | None = None  # timing until the first optimizer step
        self.startup_fields: dict[str, float] = {}  # said at that step, logged with the next train row
        if enabled:
            self.sinks, self.console = build_sinks(
                run_dir, total_steps, start_step, wandb_project, run_config, mlflow
            )

    def log(self, row: dict[str, Any]) -> None:
        if self.startup_fields and "loss" in row:  # in the first train row: no row of its own to filter out
            row = {**row, **self.startup_fields}
            self.startup_fields = {}
        for sink in self.sinks:
            sink.log(row)

    def attach(self, path: Path) -> None:
        for sink in self.sinks:
            sink.attach(path)

    def time_first_step(self, clock: StartupClock) -> None:
        """Book the time until the first `advance` as the clock's last phase, then say every phase once."""
        self.startup = clock if self.enabled else None

    def advance(self, step: int) -> None:
        if self.startup is not None:
            self.startup.lap("first step")
            self.print(self.startup.line())
            self.startup_fields, self.startup = self.startup.row(), None
        if self.console is not None:
            self.console.advance(step)

    def print(self, message: RenderableType) -> None:
        if self.console is not None:
            self.console.print(message)

    def close(self) -> None:
        # The progress bar stops first, so what W&B prints as it finishes is not drawn over by it. `print`
        # still works afterwards: the run's last line ("done: ...") comes after the sinks are closed.
        sinks, self.sinks, failures = self.sinks, [], []  # each closed once, whichever fails
        for sink in reversed(sinks):
            try:
                sink.close()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
