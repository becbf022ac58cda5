"""The run dir at the start of a run: its own files (config.yaml, ds_config.json, data_provenance.json and
the data snapshot), written once by rank 0, and the check that its filesystem can hold what the run will
write (keep_last + 1 checkpoints, metrics and plot), said by rank 0 as a warning before the first step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstrain import storage
from dstrain.config.sources import train_patterns

if TYPE_CHECKING:
    import torch

    from dstrain.config.run import RunConfig
    from dstrain.data.sources import Mixture
    from dstrain.training.prepare import Prepared


def write_run_files(
    output_dir: Path,
    config_yaml: str,
    ds: dict[str, Any],
    train: list[str] | None = None,
    snapshot: dict[str, Any] | None = None,
    mixture: Mixture | None = None,
) -> None:
    """config.yaml (headed by the dstrain version that wrote it), ds_config.json, data_provenance.json (the
    training files' fingerprints, a mixture's also by source, and the data snapshot's record, when the run
    has one)."""
    from dstrain import __version__
    from dstrain.data.provenance import describe_files

    with storage.guard(storage.run_place(output_dir), "the run files", output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        header = f"# written by dstrain {__version__}\n"
        (output_dir / "config.yaml").write_text(header + config_yaml, encoding="utf-8")
        (output_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
        provenance: dict[str, Any] = {"train": describe_files(train) if train else []}
        if mixture is not None:
            provenance["sources"] = dict(zip(mixture.names, mixture.describe_files(), strict=True))
        if snapshot:
            provenance["snapshot"] = snapshot
        (output_dir / "data_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def start_run_dir(cfg: RunConfig, prepared: Prepared, snapshot: dict[str, Any], new_snapshot: bool) -> None:
    """Rank 0, once every rank has joined: the run files, and the data snapshot when it is new."""
    output_dir = Path(cfg.output_dir)
    if new_snapshot:
        from dstrain.data.snapshot import take

        take(output_dir, snapshot)
    write_run_files(
        output_dir, prepared.config_yaml, prepared.ds, train_patterns(cfg.data), snapshot, prepared.mixture
    )


def config_bytes(prepared: Prepared) -> int:
    """config.yaml + ds_config.json + ds_config.source.json as a checkpoint stores them."""
    texts = (
        prepared.config_yaml,
        json.dumps(prepared.ds, indent=2),
        json.dumps(prepared.ds_source, indent=2),
    )
    return sum(len(text.encode()) + 1 for text in texts)


def space_warning(cfg: RunConfig, prepared: Prepared, model: torch.nn.Module, start_step: int) -> str | None:
    """Why output_dir's filesystem cannot hold what the rest of the run writes (None when it can)."""
    from dstrain.checkpoint import layout, sizing

    output_dir = Path(cfg.output_dir)
    free = storage.free_bytes(output_dir)
    if free is None:
        return None
    one = sizing.checkpoint_bytes(
        sizing.trainable_shapes(model),
        prepared.plan.devices,
        config_bytes=config_bytes(prepared),
        data_files=len(prepared.train.corpus.files),
    )
    train = cfg.train
    rows = sizing.logged_rows(
        max(0, prepared.total_steps - start_step), train.log_every, train.eval_every, bool(prepared.eval)
    )
    existing = len(layout.list_checkpoints(layout.checkpoints_dir(output_dir)))
    needed = sizing.run_bytes(one, train.keep_last, rows, existing)
    if needed <= free:
        return None
    count = max(0, train.keep_last + 1 - existing)
    return (
        f"output_dir {output_dir} is on a filesystem with {storage.human(free)} free, but this run will "
        f"write about {storage.human(needed)} more: {count} checkpoints of {storage.human(one)} (train.keep_last "
        f"{train.keep_last}, and the newest is written before the oldest is deleted"
        f"{f', {existing} already there' if existing else ''}) plus metrics and plot. Free space there, "
        "lower train.keep_last, or move output_dir, before a save fails"
    )
