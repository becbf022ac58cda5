"""Loss / eval / throughput curves of a run dir as one PNG (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from dstrain import storage
from dstrain.errors import DstrainError

PLOT_NAME = "loss.png"


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
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = out or run_dir / PLOT_NAME
    try:
        with storage.guard(storage.run_place(run_dir), "the loss plot", out):
            fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out
