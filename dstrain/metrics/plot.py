"""Loss / eval / throughput curves of a run dir as one PNG (matplotlib, no display needed); with named eval
sets also each set's eval loss against its value at the first eval, the forgetting baseline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dstrain import storage
from dstrain.errors import DstrainError

PLOT_NAME = "loss.png"
SET_LOSS = "eval_loss/"  # a named eval set's loss: eval_loss/<name>


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DstrainError(f"{path}: not found; is {run_dir} a dstrain run directory?")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DstrainError(f"{path}:{number}: not valid JSON") from None
    return rows


def source_losses(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """A mixture's `loss/<name>` curves, as (step, loss) points (a window that drew nothing has none)."""
    keys = sorted({key for row in rows for key in row if key.startswith("loss/")})
    return {key: [(r["step"], r[key]) for r in rows if r.get(key) is not None] for key in keys}


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write train loss (a mixture's per source too, + eval loss) and tokens/s against step; returns the PNG
    path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("loss") is not None]  # None: every micro batch was NaN (skipped)
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        raise DstrainError(f"{run_dir / 'metrics.jsonl'}: no training rows to plot yet")
    changes = eval_set_changes(evals)
    fig, axes = plt.subplots(1, 3 if changes else 2, figsize=(16 if changes else 11, 4))
    ax_loss, ax_speed = axes[:2]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    for key, points in source_losses(train).items():  # a mixture: each source's own train loss
        ax_loss.plot(*zip(*points, strict=True), "--", lw=1, label=f"train {key}")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_speed.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green")
    ax_speed.set(xlabel="step", ylabel="tokens/s (all ranks)", title="throughput")
    ax_speed.grid(alpha=0.3)
    if changes:
        draw_eval_sets(axes[2], changes)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = out or run_dir / PLOT_NAME
    try:
        with storage.guard(storage.run_place(run_dir), "the loss plot", out):
            fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out


@dataclass(frozen=True)
class SetChange:
    """One named eval set's eval loss minus its value at `baseline_step` (its first eval: step 0 when the
    run evaluated before training), at each eval step."""

    baseline_step: int
    steps: list[int]
    changes: list[float]


def eval_set_changes(evals: list[dict]) -> dict[str, SetChange]:
    """Each named eval set's change of eval loss since its first eval, by set name (none without named
    sets). A set added on resume (--set data.eval=...) starts from its own first eval."""
    names = dict.fromkeys(key[len(SET_LOSS) :] for row in evals for key in row if key.startswith(SET_LOSS))
    out = {}
    for name in names:
        points = [(r["step"], r[SET_LOSS + name]) for r in evals if r.get(SET_LOSS + name) is not None]
        base_step, base = points[0]
        out[name] = SetChange(base_step, [step for step, _ in points], [value - base for _, value in points])
    return out


def draw_eval_sets(ax: Any, changes: dict[str, SetChange]) -> None:
    """Above 0: the set's loss rose since its baseline (for a general set: forgetting)."""
    for name, change in changes.items():
        ax.plot(change.steps, change.changes, "o-", label=f"{name} (vs step {change.baseline_step})")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel="step", ylabel="eval loss - baseline", title="eval sets vs their first eval")
    ax.legend()
    ax.grid(alpha=0.3)
