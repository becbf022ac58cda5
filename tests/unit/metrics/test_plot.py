"""`dstrain plot`: the run's curves as one PNG; with named eval sets, each set against its first eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain.metrics import plot

TRAIN = [{"step": s, "loss": 3.0 - s / 10, "tokens_per_s": 100.0} for s in range(1, 5)]


def write_rows(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_each_named_set_is_drawn_against_its_first_eval(tmp_path, monkeypatch):
    evals = [
        {"step": 0, "eval_loss": 2.0, "eval_loss/rag": 1.5, "eval_loss/general": 2.5},
        {"step": 2, "eval_loss": 1.8, "eval_loss/rag": 1.0, "eval_loss/general": 2.75},
        # a set added on resume (--set data.eval=...) starts from its own first eval
        {"step": 4, "eval_loss": 1.7, "eval_loss/rag": 0.75, "eval_loss/general": 3.0, "eval_loss/new": 4.0},
    ]
    write_rows(tmp_path / "run", TRAIN + evals)
    drawn = []
    draw = plot.draw_eval_sets
    monkeypatch.setattr(
        plot, "draw_eval_sets", lambda ax, changes: (drawn.append(changes), draw(ax, changes))
    )
    out = plot.plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / plot.PLOT_NAME and out.stat().st_size > 0
    (changes,) = drawn
    assert changes == {
        "rag": plot.SetChange(0, [0, 2, 4], [0.0, -0.5, -0.75]),
        "general": plot.SetChange(0, [0, 2, 4], [0.0, 0.25, 0.5]),
        "new": plot.SetChange(4, [4], [0.0]),
    }


def test_no_set_panel_without_named_sets(tmp_path, monkeypatch):
    write_rows(tmp_path / "run", [*TRAIN, {"step": 0, "eval_loss": 2.0}, {"step": 4, "eval_loss": 1.5}])
    monkeypatch.setattr(plot, "draw_eval_sets", lambda *_: pytest.fail("no named sets, no panel"))
    assert plot.plot_run(tmp_path / "run").is_file()
