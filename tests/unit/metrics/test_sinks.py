"""Each sink writes what it should into a tmp run dir; MetricsSink fans out to them on rank 0 only.

TensorBoard events are read back with tensorboard's own EventAccumulator; W&B is a stand-in module (wandb
is not a dependency), so what dstrain hands `wandb.init` and `run.log` is checked, not W&B itself.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dstrain.metrics.sinks import (
    ConsoleSink,
    JsonlSink,
    MetricsSink,
    TensorBoardSink,
    WandbSink,
    keep_rows_up_to,
    tb_tag,
    wandb_run_id,
)

ROWS = [
    {"step": 1, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1234.5, "tokens": 100, "mfu": None},
    {"step": 2, "loss": 2.25, "lr": 2e-4, "tokens_per_s": 1300.0, "tokens": 200, "note": "text"},
    {"step": 2, "eval_loss": 2.125, "eval_pref_acc": 0.5},
]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ------------------------------------------------------------------------------------------ metrics.jsonl


def test_jsonl_writes_one_object_per_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 7}\n', encoding="utf-8")  # a fresh run starts the file over
    sink = JsonlSink(path)
    for row in ROWS:
        sink.log(row)
    assert _rows(path) == ROWS  # flushed per row: readable before close
    sink.close()
    assert path.read_text(encoding="utf-8") == "".join(json.dumps(row) + "\n" for row in ROWS)


def _killed_run_file(path: Path) -> None:
    lines = [json.dumps({"step": step, "loss": float(step)}) for step in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo', encoding="utf-8")  # cut by the kill


def test_keep_rows_up_to_drops_later_rows_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _killed_run_file(path)
    keep_rows_up_to(path, 2)
    assert [row["step"] for row in _rows(path)] == [1, 2]
    assert path.read_text(encoding="utf-8").endswith("\n")


def test_keep_rows_up_to_without_a_file_creates_none(tmp_path):
    keep_rows_up_to(tmp_path / "metrics.jsonl", 3)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_jsonl_on_resume_keeps_the_rows_up_to_the_checkpoint_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _killed_run_file(path)
    sink = JsonlSink(path, start_step=2)
    sink.log({"step": 3, "loss": 30.0})
    sink.close()
    assert _rows(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]


# -------------------------------------------------------------------------------------------- TensorBoard


def test_tb_tags():
    assert tb_tag("loss") == "train/loss"
    assert tb_tag("eval_loss") == "eval/loss"
    assert tb_tag("eval_pref_acc") == "eval/pref_acc"
    assert tb_tag("eval_loss/rag") == "eval/loss/rag"  # a named eval set's, beside the whole's


def test_tensorboard_writes_numeric_values_under_their_tags(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    for row in ROWS:
        sink.log(row)
    sink.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    scalars = _scalars(tmp_path / "tb")
    # None and text are left out; "step" is the x axis, not a scalar
    assert set(scalars) == {
        "train/loss",
        "train/lr",
        "train/tokens_per_s",
        "train/tokens",
        "eval/loss",
        "eval/pref_acc",
    }
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.25)]
    assert scalars["eval/loss"] == [(2, 2.125)]
    assert scalars["train/tokens"] == [(1, 100.0), (2, 200.0)]


def test_tensorboard_on_resume_hides_what_a_killed_run_logged_after_the_checkpoint(tmp_path):
    first = TensorBoardSink(tmp_path / "tb")
    for step in (1, 2, 3, 4):
        first.log({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path / "tb", start_step=2)
    resumed.log({"step": 3, "loss": 30.0})
    resumed.close()
    assert _scalars(tmp_path / "tb")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


# ------------------------------------------------------------------------------------------------ W&B


class _FakeRun:
    def __init__(self, **init) -> None:
        self.init, self.logged, self.finished = init, [], False

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch) -> SimpleNamespace:
    """A `wandb` module whose `init` records its run; `.runs` lists them."""
    record = SimpleNamespace(runs=[])
    module = ModuleType("wandb")

    def init(**kwargs) -> _FakeRun:
        record.runs.append(_FakeRun(**kwargs))
        return record.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return record


def test_wandb_sink_logs_rows_without_step_or_none(tmp_path, fake_wandb):
    run_dir = tmp_path / "my-run"
    sink = WandbSink(run_dir, "proj", {"lora": {"r": 8}})
    for row in ROWS:
        sink.log(row)
    sink.close()
    (run,) = fake_wandb.runs
    assert run.init == {
        "project": "proj",
        "name": "my-run",
        "id": wandb_run_id(run_dir),
        "resume": "allow",
        "dir": str(run_dir),
        "config": {"lora": {"r": 8}},
    }
    assert run.logged[0] == (1, {"loss": 2.5, "lr": 1e-4, "tokens_per_s": 1234.5, "tokens": 100})
    assert run.logged[2] == (2, {"eval_loss": 2.125, "eval_pref_acc": 0.5})
    assert run.finished


def test_one_wandb_run_per_run_dir(tmp_path):
    run_id = wandb_run_id(tmp_path / "run")
    assert run_id == wandb_run_id(tmp_path / "sub" / ".." / "run")  # the resolved path decides
    assert run_id != wandb_run_id(tmp_path / "other")
    assert len(run_id) <= 64 and all(c.isalnum() or c == "-" for c in run_id)
    assert run_id.endswith("-run")  # the end of the path, the part that tells runs apart, is kept


# -------------------------------------------------------------------------------------------- console


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_console_prints_eval_lines_messages_and_the_final_bar():
    console, out = _console()
    sink = ConsoleSink(console, total_steps=10)
    sink.print("hello [bold]there[/]")
    for row in ROWS:
        sink.log(row)
    sink.advance(2)
    sink.close()
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["hello there", "step 2: eval_loss 2.1250"]
    assert lines[2].startswith("train ")
    assert "2/10 loss 2.2500 lr 2.00e-04 1300 tok/s" in lines[2]


def test_console_eval_line_lists_the_named_sets():
    console, out = _console()
    sink = ConsoleSink(console, total_steps=10)
    sink.log(
        {"step": 4, "eval_loss": 2.0, "eval_loss/rag": 1.5, "eval_loss/general": 2.5, "eval_pref_acc/rag": 1}
    )
    sink.close()
    assert out.getvalue().splitlines()[0] == "step 4: eval_loss 2.0000 (rag 1.5000, general 2.5000)"


def test_console_starts_the_bar_at_the_resumed_step():
    console, out = _console()
    sink = ConsoleSink(console, total_steps=10, start_step=4)
    sink.log({"step": 5, "loss": None, "lr": 0.0, "tokens_per_s": 0.0})  # no loss: the info stays as it was
    sink.close()
    assert "4/10" in out.getvalue() and "loss" not in out.getvalue()


# ------------------------------------------------------------------------------------------ MetricsSink


def test_metrics_sink_disabled_writes_nothing(tmp_path, capsys):
    sink = MetricsSink(tmp_path / "run", total_steps=5, enabled=False, wandb_project="proj")
    sink.print("not on this rank")
    for row in ROWS:
        sink.log(row)
    sink.advance(2)
    sink.close()
    assert not list(tmp_path.iterdir())
    assert capsys.readouterr().out == ""


def test_metrics_sink_fans_out_without_loading_wandb(tmp_path, capsys):
    if "wandb" in sys.modules:
        pytest.skip("wandb was imported by something else in this process")
    run_dir = tmp_path / "run"
    sink = MetricsSink(run_dir, total_steps=5, enabled=True)
    for row in ROWS:
        sink.log(row)
    sink.advance(2)
    sink.close()
    sink.print("done: after close")  # the run's last line comes after the sinks are closed
    assert "wandb" not in sys.modules
    assert _rows(run_dir / "metrics.jsonl") == ROWS
    assert _scalars(run_dir / "tb")["eval/pref_acc"] == [(2, 0.5)]
    out = capsys.readouterr().out
    assert "step 2: eval_loss 2.1250" in out and out.endswith("done: after close\n")


def test_metrics_sink_resumes_the_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _killed_run_file(run_dir / "metrics.jsonl")
    sink = MetricsSink(run_dir, total_steps=5, enabled=True, start_step=3)
    sink.log({"step": 4, "loss": 40.0, "lr": 0.1, "tokens_per_s": 1.0})
    sink.close()
    assert [(row["step"], row["loss"]) for row in _rows(run_dir / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]


def test_metrics_sink_with_a_project_logs_to_wandb(tmp_path, fake_wandb, capsys):
    sink = MetricsSink(tmp_path / "run", 5, True, wandb_project="proj", run_config={"seed": 1})
    for row in ROWS:
        sink.log(row)
    sink.close()
    (run,) = fake_wandb.runs
    assert run.init["config"] == {"seed": 1} and [step for step, _ in run.logged] == [1, 2, 2]
    assert run.finished
    assert len(_rows(tmp_path / "run" / "metrics.jsonl")) == len(ROWS)


def test_a_failing_wandb_init_leaves_the_run_dir_untouched(tmp_path, fake_wandb, monkeypatch):
    def refuse(**_):
        raise RuntimeError("wandb: not logged in")

    monkeypatch.setattr(sys.modules["wandb"], "init", refuse)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _killed_run_file(run_dir / "metrics.jsonl")
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(RuntimeError, match="not logged in"):
        MetricsSink(run_dir, 5, True, start_step=2, wandb_project="proj")
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert not (run_dir / "tb").exists()
