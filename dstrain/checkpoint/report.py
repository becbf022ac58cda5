"""`dstrain inspect CKPT`: what a checkpoint holds, and whether every file matches its manifest.

Also its format and the dstrain that wrote it (a format-1 checkpoint is named as warm-start only), and
whether each training file it recorded still matches its fingerprint (`dstrain.data.provenance`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from dstrain.checkpoint import layout
from dstrain.checkpoint.load import check_readable_format, is_checkpoint_dir, read_json, verify
from dstrain.checkpoint.state import CONFIG, DS_CONFIG, DS_SOURCE, OPTIMIZER, rng_file
from dstrain.config.metrics import higher_is_better
from dstrain.errors import CheckpointError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name: what adapter_config.json names when it is no local path


def target_dir(path: Path) -> Path:
    """A checkpoint dir as given; for a run dir its newest by step (the one `dstrain resume` tries first)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; give a checkpoint dir or a run dir")
    if is_checkpoint_dir(path):
        return path
    root = path if path.name == "checkpoints" else layout.checkpoints_dir(path)
    found = layout.list_checkpoints(root)
    if not found:
        raise CheckpointError(f"{path}: neither a checkpoint dir nor a run dir with checkpoints")
    return found[-1]


def file_rows(ckpt: Path) -> list[dict[str, Any]]:
    manifest_path = ckpt / layout.MANIFEST
    listed: dict[str, Any] = {}
    if manifest_path.is_file():
        try:
            listed = json.loads(manifest_path.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError):
            listed = {}
    names = sorted(set(listed) | {p.name for p in ckpt.iterdir() if p.is_file()} if ckpt.is_dir() else set())
    rows = []
    for name in names:
        path = ckpt / name
        size = path.stat().st_size if path.is_file() else None
        rows.append({"name": name, "size": size, "in_manifest": name in listed or name == layout.MANIFEST})
    return rows


def best_metric_name(ckpt: Path) -> str:
    """train.best_metric of the run (its config.yaml travels in every checkpoint)."""
    try:
        raw = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
        return str(raw["train"]["best_metric"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "eval_loss"


def data_rows(ckpt: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Each recorded training file and whether it still matches (relative paths: from the run dir's parent,
    where the golden fixtures and most runs start, then the current directory)."""
    from dstrain.data.provenance import file_status

    files = state.get("data_files") or []
    base = ckpt.parent.parent.parent if ckpt.parent.name == "checkpoints" else None
    return [{**record, "status": file_status(record, base)} for record in files if isinstance(record, dict)]


def source_rows(ckpt: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """A mixture's sources as the checkpoint recorded them (position, tokens), each file with its status."""
    from dstrain.data.provenance import file_status

    base = ckpt.parent.parent.parent if ckpt.parent.name == "checkpoints" else None
    rows = []
    for entry in state.get("sources") or []:
        if isinstance(entry, dict):
            files = [
                {**f, "status": file_status(f, base)} for f in entry.get("files") or [] if isinstance(f, dict)
            ]
            rows.append({**entry, "files": files})
    return rows


def base_info(ckpt: Path) -> dict[str, Any]:
    """The base model adapter_config.json names, whether it is a model dir here, and how to load it if not
    (or if it is dstrain's builtin, whose path is that of one install)."""
    try:
        name = read_json(ckpt / "adapter_config.json").get("base_model_name_or_path")
        model_path = str(yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))["model"]["path"])
    except (CheckpointError, OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return {"name_or_path": None, "found": False, "note": None}  # verify() names the unreadable file
    found = isinstance(name, str) and (Path(name) / "config.json").is_file()
    return {"name_or_path": name, "found": found, "note": base_note(str(name), model_path, found)}


def base_note(name: str, model_path: str, found: bool) -> str | None:
    load = "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR), CKPT)"
    if model_path.startswith("builtin:"):
        return (
            f"{model_path} ships inside the dstrain package: adapter_config.json names the copy of the "
            "install that trained it; with dstrain installed, load the base anywhere with "
            f"dstrain.model.build.load_base_model(ModelConfig(path={model_path!r})), then "
            "PeftModel.from_pretrained(base, CKPT)"
        )
    relative = not Path(name).is_absolute()
    if found and relative:
        return f"{name} is a relative path (before 0.2.0): found from here only; `dstrain export` names it absolute"
    if found:
        return None
    if HUB_ID.fullmatch(name) and relative:
        return f"{name} is no local dir here: AutoPeftModelForCausalLM looks it up on the Hub; or {load}"
    where = "a relative path (before 0.2.0)" if relative else "moved, or on another machine"
    return f"the base {name} is not found here ({where}): load it with {load}"


def run_dir_of(ckpt: Path) -> Path | None:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def snapshot_info(ckpt: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The run's data snapshot (data.snapshot), if it has one, and whether its files are still intact."""
    from dstrain.data.snapshot import SNAPSHOT_DIR, matches

    snap = state.get("data_snapshot") or {}
    run_dir = run_dir_of(ckpt)
    if not snap or run_dir is None:
        return None
    entries = [*snap.get("train", []), *snap.get("eval", [])]
    intact = sum(matches(run_dir, entry) for entry in entries)
    return {
        "mode": snap.get("mode"),
        "dir": str(run_dir / SNAPSHOT_DIR),
        "files": len(entries),
        "intact": intact,
    }


def size_info(ckpt: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Its bytes on disk, the estimate dstrain makes before a save (checkpoint/sizing.py), and what
    train.keep_last + 1 of them need against what is free on that filesystem."""
    from dstrain.checkpoint import sizing
    from dstrain.storage import free_bytes

    actual = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
    estimate = None
    shapes = sizing.shapes_in_checkpoint(ckpt) if (ckpt / OPTIMIZER).is_file() else None
    if shapes is not None:
        texts = sum((ckpt / n).stat().st_size for n in (CONFIG, DS_CONFIG, DS_SOURCE) if (ckpt / n).is_file())
        files = len(state.get("data_files") or []) or 1
        world = int(state.get("world_size") or 1)
        rng = ckpt / rng_file(0)  # its own size: measuring this process's generators would import torch
        rng_bytes = rng.stat().st_size if rng.is_file() else None
        estimate = sizing.checkpoint_bytes(
            shapes, world, config_bytes=texts, data_files=files, rng_bytes=rng_bytes
        )
    keep = keep_last(ckpt)
    return {
        "bytes": actual,
        "estimate": estimate,
        "keep_last": keep,
        "needed": (keep + 1) * actual,
        "free": free_bytes(ckpt),
    }


def keep_last(ckpt: Path) -> int:
    try:
        return int(yaml.safe_load((ckpt / CONFIG).read_text(encoding="utf-8"))["train"]["keep_last"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return 3


def format_info(ckpt: Path) -> dict[str, Any]:
    manifest = layout.read_manifest(ckpt) or {}
    number = layout.format_version(manifest.get("format"))
    return {
        "format": manifest.get("format"),
        "written_by": manifest.get("dstrain"),  # absent before 0.2.0
        "resumable": "exact" if number and number >= 2 else "warm start only (no optimizer state)",
    }


def summary(ckpt: Path, problems: list[str]) -> dict[str, Any]:
    state_path = ckpt / "trainer_state.json"
    state: dict[str, Any] = {}
    if state_path.is_file():
        try:
            state = read_json(state_path)
        except CheckpointError as exc:
            problems.append(str(exc))
    name, best = best_metric_name(ckpt), state.get("best_metric")
    if best is not None and higher_is_better(name):
        best = -best  # stored so that lower is better
    keys = ("step", "epoch", "cursor", "samples", "tokens", "world_size", "global_batch", "config_digest")
    return {
        "path": str(ckpt),
        **{key: state.get(key) for key in keys},
        "best_metric_name": name,
        "best_metric": best,
        "best_checkpoint": state.get("best_checkpoint"),
        "versions": state.get("versions"),
        **format_info(ckpt),
        "base": base_info(ckpt),
        "data": data_rows(ckpt, state),
        "snapshot": snapshot_info(ckpt, state),
        "size": size_info(ckpt, state),
        "sources": source_rows(ckpt, state),
        "mixture_origin": state.get("mixture_origin") or {},
        "files": file_rows(ckpt),
        "valid": not problems,
        "problems": problems,
    }


def render(info: dict[str, Any], console: Console) -> None:
    table = Table(title=f"checkpoint {info['path']}", show_header=False, box=None)
    for key in (
        "step",
        "epoch",
        "cursor",
        "samples",
        "tokens",
        "world_size",
        "global_batch",
        "config_digest",
    ):
        value = info[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    if info["best_metric"] is not None:
        best = f"{info['best_metric']:.4f} ({info['best_checkpoint']})"
        table.add_row(f"best {info['best_metric_name']}", best)
    if info["versions"]:
        table.add_row("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    table.add_row("format", f"{info['format']} (written by dstrain {info['written_by'] or 'before 0.2.0'})")
    table.add_row("resume", info["resumable"])
    base = info["base"]
    table.add_row("base", f"{base['name_or_path']} ({'found' if base['found'] else 'not found here'})")
    table.add_row("size", size_line(info["size"]))
    table.add_row("data snapshot", snapshot_line(info["snapshot"]))
    console.print(table)
    if base["note"]:
        console.print(f"[yellow]note:[/] {base['note']}", soft_wrap=True)
    render_data(info["data"], console)
    render_sources(info["sources"], console)
    files = Table("file", "bytes", "manifest")
    for row in info["files"]:
        size = "missing" if row["size"] is None else f"{row['size']:,}"
        files.add_row(row["name"], size, "yes" if row["in_manifest"] else "[red]not listed")
    console.print(files)


def size_line(size: dict[str, Any]) -> str:
    from dstrain.storage import human

    estimate = f" (estimated before saving: {human(size['estimate'])})" if size["estimate"] else ""
    free = f", {human(size['free'])} free there" if size["free"] is not None else ""
    count = size["keep_last"] + 1
    return (
        f"{human(size['bytes'])}{estimate}; train.keep_last {size['keep_last']} + 1 = {count} checkpoints "
        f"need {human(size['needed'])}{free}"
    )


def snapshot_line(snap: dict[str, Any] | None) -> str:
    if snap is None:
        return "none (data.snapshot: off)"
    state = "intact" if snap["intact"] == snap["files"] else f"[red]{snap['files'] - snap['intact']} changed"
    files = f"{snap['files']} file{'' if snap['files'] == 1 else 's'}"
    return f"{snap['mode']}: {files} in {snap['dir']}, {state}"


def render_data(rows: list[dict[str, Any]], console: Console) -> None:
    if not rows:
        return
    data = Table("data file", "bytes", "fingerprint", "now")
    for row in rows:
        status = row["status"] if row["status"] == "matches" else f"[red]{row['status']}"
        data.add_row(str(row.get("path")), f"{row.get('size', 0):,}", str(row.get("fingerprint")), status)
    console.print(data)


def render_sources(rows: list[dict[str, Any]], console: Console) -> None:
    if not rows:
        return
    table = Table(
        "source", "weight", "format", "records", "given", "next: epoch", "cursor", "tokens", "files"
    )
    for row in rows:
        statuses = {f["status"] for f in row["files"]}
        files = (
            "matches"
            if statuses == {"matches"}
            else "[red]" + ", ".join(sorted(statuses) or ["none recorded"])
        )
        limits = "".join(f" {key} {row[key]}" for key in ("max_samples", "epochs") if row.get(key))
        table.add_row(
            f"{row.get('name')}{limits}",
            f"{row.get('weight', 0):g}",
            str(row.get("format")),
            f"{row.get('records', 0):,}",
            f"{row.get('samples', 0):,}",
            str(row.get("epoch")),
            f"{row.get('cursor', 0):,}",
            f"{row.get('tokens', 0):,}",
            files,
        )
    console.print(table)


def inspect_checkpoint(path: Path, as_json: bool = False) -> int:
    """Print the checkpoint's summary; return 1 (naming each bad file) if it does not match its manifest."""
    ckpt = target_dir(Path(path))
    check_readable_format(ckpt)  # a newer format: one error naming both formats, not a list of problems
    problems = verify(ckpt)
    info = summary(ckpt, problems)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        console = Console()
        render(info, console)
        for problem in problems:
            console.print(f"[red]bad:[/] {problem}", soft_wrap=True)
        console.print(
            "manifest: [green]ok" if not problems else "manifest: [red]does not match", soft_wrap=True
        )
    return 0 if not problems else 1
