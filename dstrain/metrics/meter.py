"""Step metrics: accumulated on device without host syncs, reduced across ranks only when logged.

Sinks (rank 0 only): metrics.jsonl (one JSON object per logged step), TensorBoard under tb/, and a rich
progress bar with ETA on the console.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dstrain.checkpoint.atomic import write_text_atomic
from dstrain.distributed.collectives import all_reduce_sum, comm_device

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU estimate; an unknown device gets no MFU, not a guess.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def memory_gb() -> float:
    """Peak accelerator memory of this rank, or the process RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def device_stats() -> dict[str, float]:
    """This rank's memory and, on GPU, reserved memory and utilisation (NVML, when it answers)."""
    stats = {"mem_gb": memory_gb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["mem_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        # torch asks NVML (pynvml); without it, or without permission, the optional metric is left out.
        with contextlib.suppress(Exception):
            stats["gpu_util"] = float(torch.cuda.utilization())
    return stats


def peak_flops() -> float | None:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, params: int, world: int) -> float | None:
    """Model FLOPs utilisation at 4N FLOPs per token: forward 2N plus backward to the activations 2N
    (frozen weights get no weight gradients under LoRA); attention FLOPs and recomputation not counted."""
    peak = peak_flops()
    return None if peak is None else tokens_per_s * 4 * params / (peak * world)


def max_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """The largest value of each stat on any rank: the rank closest to running out is the one that matters."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return stats

    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(keys, values.tolist(), strict=True))


class StepMeter:
    """Sums per-micro-batch loss and token counts as tensors; `.collect()` is the one host sync per log."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.nonfinite: torch.Tensor | None = None  # micro batches of the current step with a NaN/inf loss
        self.finite: torch.Tensor | None = None  # micro batches since the last log with a finite loss
        self.micro_batches = 0
        self.tokens = 0
        self.samples = 0
        self.skipped = 0  # records dropped at tokenisation under data.on_error=skip
        self.pairs: torch.Tensor | None = None  # preference objectives: [chosen, rejected, margin, right, n]
        self.data_wait_s = 0.0
        self.excluded_s = 0.0
        self.started = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Time spent outside training steps (eval, save) that throughput must not count."""
        self.excluded_s += seconds

    def add(
        self, loss: torch.Tensor, tokens: int, samples: int, data_wait_s: float, skipped: int = 0
    ) -> None:
        """One micro batch: its loss (a device tensor, not synced here), real tokens, good and bad samples."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        bad = (~finite).float()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        self.finite = (1.0 - bad) if self.finite is None else self.finite + (1.0 - bad)
        loss = torch.where(finite, loss, torch.zeros_like(loss))  # a skipped step must not poison the mean
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.tokens += tokens
        self.micro_batches += 1
        self.samples += samples
        self.skipped += skipped
        self.data_wait_s += data_wait_s

    def add_pairs(
        self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Sums of one micro batch's pair rewards over its real pairs (device tensors, not synced here)."""
        right = (margin > 0).float()
        stats = torch.stack([(v.detach().float() * valid).sum() for v in (chosen, rejected, margin, right)])
        stats = torch.cat([stats, valid.sum()[None]])
        self.pairs = stats if self.pairs is None else self.pairs + stats

    def take_nonfinite(self) -> torch.Tensor:
        """This step's count of non-finite micro-batch losses (a device tensor), reset for the next step."""
        value = self.nonfinite if self.nonfinite is not None else torch.zeros(())
        self.nonfinite = None
        return value

    def collect(self, steps: int) -> dict[str, float]:
        """Reduce over ranks: loss is the mean micro-batch loss, tokens/samples are global sums."""
        device = self.loss_sum.device
        counts = [self.tokens, self.micro_batches, self.samples, self.data_wait_s, self.skipped]
        local = torch.cat(
            [
                torch.stack([self.loss_sum.double(), self.finite.to(device, torch.float64)]),
                torch.tensor(counts, dtype=torch.float64, device=device),  # exact beyond 2**24 tokens
            ]
        )
        if self.pairs is not None:  # the same objective on every rank: the same vector length
            local = torch.cat([local, self.pairs.to(device, torch.float64)])
        loss_sum, finite, tokens, micro, samples, wait, skipped, *pairs = all_reduce_sum(local).tolist()
        elapsed = max(time.perf_counter() - self.started - self.excluded_s, 1e-9)
        ranks = micro / max(1, self.micro_batches)
        return {
            # over micro batches with a finite loss (a skipped NaN step does not drag the mean); None if none
            "loss": loss_sum / finite if finite else None,
            "tokens": int(tokens),
            "samples": int(samples),
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "step_time_s": elapsed / max(1, steps),
            "data_wait_s": wait / ranks,  # mean over ranks, summed over the logged steps
            "skipped_now": int(skipped),  # bad records dropped since the last log, all ranks
            **pair_metrics(pairs),
        }


def pair_metrics(sums: list[float]) -> dict[str, float]:
    """Mean rewards, margin and preference accuracy from summed pair statistics (none for SFT)."""
    if not sums:
        return {}
    chosen, rejected, margin, right, count = sums
    count = max(count, 1.0)
    return {
        "rewards_chosen": chosen / count,
        "rewards_rejected": rejected / count,
        "reward_margin": margin / count,
        "pref_acc": right / count,
    }


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


class MetricsSink:
    """metrics.jsonl + TensorBoard + console; a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        enabled: bool,
        start_step: int = 0,
        wandb_project: str = "",
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        # Into a log file (not a terminal) lines stay whole: a path cut at column 80 cannot be grepped.
        self.console = Console(stderr=False, soft_wrap=not sys.stdout.isatty())
        self.wandb = None
        if not enabled:
            return
        if wandb_project:
            import wandb  # checked installed in preflight

            # One W&B run per run dir: a resumed run continues the same one.
            run_id = "".join(c if c.isalnum() else "-" for c in str(run_dir.resolve()))[-64:]
            self.wandb = wandb.init(
                project=wandb_project,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=run_config or {},
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run starts the file over; a run continuing from a checkpoint keeps the rows up to it.
        path = run_dir / "metrics.jsonl"
        if start_step:
            keep_rows_up_to(path, start_step)
        self.jsonl = path.open("a" if start_step else "w", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a killed run logged after its last checkpoint, as the rows above.
        self.tb = SummaryWriter(
            log_dir=str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None
        )
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self.progress.start()

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        step = int(row["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(
                    f"train/{key}" if not key.startswith("eval_") else f"eval/{key[5:]}", value, step
                )
        if row.get("loss") is not None:
            info = f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, info=info)
        if "eval_loss" in row:
            self.console.print(f"step {step}: eval_loss {row['eval_loss']:.4f}")

    def advance(self, step: int) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step)

    def print(self, message: RenderableType) -> None:
        if self.enabled:
            self.console.print(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.stop()
        self.jsonl.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
