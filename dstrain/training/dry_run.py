"""`dstrain train --dry-run`: the report of training/plan.py, as text (rich) or one JSON object (`--json`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dstrain.config.zero import zero_stage
from dstrain.model.memory import gib
from dstrain.storage import human
from dstrain.training.plan import DryRun

SHOWN_STEPS = 8  # eval/save steps listed in full up to this many; longer lists show their ends


def dry_run(
    config: Path | None,
    overrides: list[str],
    ds_config: str | None,
    launch_flags: tuple[int | None, Path | None, int | None],
    as_json: bool,
) -> int:
    """Plan the run of `dstrain train` with these arguments; `launch_flags`: (--num-gpus, --hostfile,
    --world-size). Trains nothing, writes nothing (the data index cache aside); exit status 0."""
    from dstrain.metrics.console import json_stdout, print_json
    from dstrain.model.quant import bitsandbytes_kept_out
    from dstrain.train import resolve_config
    from dstrain.training.plan import build_report, launch_world

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, as in training
    with json_stdout(as_json) as out:
        launch = launch_world(*launch_flags)
        cfg = resolve_config(str(config) if config else None, overrides, ds_config)
        with bitsandbytes_kept_out(cfg.model.load_in_4bit):
            report = build_report(cfg, launch)
    if as_json:
        print_json(report.to_json(), out)
    else:
        render(report, Console(soft_wrap=not out.isatty()))
    return 0


def render(report: DryRun, console: Console) -> None:
    console.print(headline(report))
    console.print(optimisation_line(report.ds, report.cfg.ds_config))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(plan_table(report))
    console.print(lr_table(report))
    console.print(data_table(report))
    console.print(memory_table(report))
    console.print("dry run: nothing was trained or written; `dstrain train` without --dry-run starts it")


def headline(report: DryRun) -> str:
    cfg = report.cfg
    base = "4-bit NF4" if cfg.model.load_in_4bit else cfg.model.dtype
    return (
        f"[bold]dry run[/] of {cfg.model.path} ({base} base) + LoRA r={cfg.lora.r}, objective "
        f"{cfg.objective.name}, ZeRO-{zero_stage(report.ds)}, world {report.launch.world} "
        f"({report.launch.how}); output_dir {cfg.output_dir}"
    )


def optimisation_line(ds: dict[str, Any], source: str) -> str:
    """The resolved ZeRO JSON in one line: optimizer, scheduler, clipping, offload."""
    optimizer = ds.get("optimizer") or {}
    scheduler = (ds.get("scheduler") or {}).get("type", "constant LR")
    zero = ds.get("zero_optimization") or {}
    offload = [
        f"{what} -> {(zero.get(key) or {}).get('device')}"
        for what, key in (("optimizer", "offload_optimizer"), ("params", "offload_param"))
        if (zero.get(key) or {}).get("device", "none") not in (None, "none")
    ]
    lr = (optimizer.get("params") or {}).get("lr")
    return (
        f"ZeRO JSON {source}: {optimizer.get('type')} lr {lr}, {scheduler}, gradient clipping "
        f"{ds.get('gradient_clipping', 0)}, offload {', '.join(offload) or 'none'}"
    )


def steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= SHOWN_STEPS:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-2:]))} ({len(steps)} in all)"


def two_columns(title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, show_edge=False)
    table.add_column("what", overflow="fold")
    table.add_column("value", overflow="fold")
    return table


def plan_table(report: DryRun) -> Table:
    plan, train = report.plan, report.cfg.train
    table = two_columns("plan")
    ranks = f"world {plan.data_parallel}"
    if plan.sequence_parallel > 1:
        ranks = f"{plan.data_parallel} data-parallel ranks (sequence-parallel {plan.sequence_parallel})"
    table.add_row(
        "global batch",
        f"{plan.global_batch} = micro {plan.micro} x accumulation {plan.accumulation} x {ranks}",
    )
    epochs = f"{plan.epochs:g} epoch{'' if plan.epochs == 1 else 's'}"
    table.add_row(
        "steps",
        f"{plan.total_steps} ({epochs} of {plan.steps_per_epoch} steps, {plan.train_samples} samples)",
    )
    table.add_row("warmup / decay", f"{plan.warmup_steps} / {plan.decay_steps} steps")
    table.add_row("eval at", steps_text(plan.eval_steps))
    table.add_row("save at", f"{steps_text(plan.save_steps)} (keep_last {train.keep_last})")
    memory = report.memory
    table.add_row(
        "disk",
        f"{human(memory.checkpoint_bytes)} per checkpoint; at most {human(memory.disk_bytes)} in output_dir "
        f"({train.keep_last + 1} checkpoints while the newest is written, metrics and plot)",
    )
    return table


def lr_table(report: DryRun) -> Table:
    table = Table(title="learning rate of each step's update", title_justify="left", show_edge=False)
    table.add_column("step", justify="right")
    table.add_column("lr", justify="right")
    for step, lr in report.plan.lr.items():
        table.add_row(str(step), f"{lr:.4g}")
    return table


def data_table(report: DryRun) -> Table:
    data = report.data
    sampled = f"{data.sampled} of {data.records}" if data.sampled < data.records else f"all {data.records}"
    table = two_columns(f"data (token lengths: {sampled} records, as the run tokenises them)")
    for f in data.files:
        cleaned = f", {f.cleaned} changed by cleaning" if f.cleaned else ""
        table.add_row(f.path, f"{f.records} records, {f.bad} bad{cleaned}")
    table.add_row("eval set", f"{data.eval_records} records")
    for part, p in data.lengths.items():
        table.add_row(f"{part} tokens", f"p50 {p.p50}, p90 {p.p90}, p99 {p.p99}, max {p.max}")
    if data.passages_cut is not None and data.cut_tokens is not None:
        cut = data.cut_tokens
        by = f", by p50 {cut.p50} / p90 {cut.p90} / max {cut.max} tokens" if data.passages_cut else ""
        table.add_row(
            f"passages cut to {data.max_passage_tokens}",
            f"{data.passages_cut} of {data.sampled - data.over_long} prompts{by}",
        )
    table.add_row("over-long records", f"{data.over_long} of {data.sampled} (the run skips or fails on them)")
    return table


def memory_table(report: DryRun) -> Table:
    """The start-up memory table's rows (model/memory.py), with this machine's capacity when the job runs here."""
    memory = report.memory
    place = {"device": "GPU" if memory.cuda else "host", "host": "host (offload)" if memory.cuda else "host"}
    table = Table(title="estimated memory per rank", title_justify="left", show_edge=False)
    for column in ("term", "where", "estimate"):
        table.add_column(column, justify="right" if column == "estimate" else "left")
    for term in memory.terms:
        if term.bytes:
            table.add_row(term.name, place[term.where], gib(term.bytes))
    for where, total in memory.totals.items():
        room = f" of {gib(memory.capacity[where])} here" if memory.capacity else ""
        table.add_row(f"[bold]total {where}[/]", "", f"[bold]{gib(total)}[/]{room}")
    table.add_row("model build (before ZeRO moves it)", "host", gib(memory.build_peak))
    return table
