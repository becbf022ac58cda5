"""Data snapshots end to end (data.snapshot: link | copy): a run whose training (and eval) file is rewritten
after it began resumes from its snapshot bitwise, with a one-line notice; inspect shows the snapshot and
export leaves it out. Without a snapshot the resume is refused as before (tests/unit/data/test_snapshot.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dstrain.checkpoint.export import export_checkpoint
from dstrain.checkpoint.report import summary
from dstrain.data.snapshot import HARD_LINK_CAVEAT
from tests.helpers import check, dstrain, metrics, train_single, write_config

TRAIN = {"max_steps": 4, "save_every": 2, "keep_last": 5, "log_every": 1}


def rewrite(path: Path, in_place: bool) -> None:
    """Regenerate a data file: the same records in another order (same size: only the fingerprint tells)."""
    text = "".join(reversed(path.read_text(encoding="utf-8").splitlines(keepends=True)))
    if in_place:
        path.write_text(text, encoding="utf-8")
        return
    new = path.with_name(path.name + ".new")  # as `dstrain convert` writes: beside it, then renamed
    new.write_text(text, encoding="utf-8")
    new.replace(path)


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in metrics(run_dir)]


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_a_rewritten_source_resumes_bitwise_from_the_snapshot(tmp_path: Path, small_data: dict, mode: str):
    config = write_config(tmp_path, small_data, data={"snapshot": mode}, train=TRAIN)
    run_dir = tmp_path / "run"
    proc = check(train_single(config, cwd=tmp_path))
    shared = (run_dir / "data_snapshot/train/00-train.jsonl").stat().st_ino == small_data[
        "train"
    ].stat().st_ino
    assert (f"warning: {HARD_LINK_CAVEAT}" in proc.stdout) == shared  # hard links, not reflinks: said once
    rows = losses(run_dir)
    final = load_file(str(run_dir / "checkpoints/step-00000004/adapter_model.safetensors"))

    # a hard link survives a file replaced by a new one; a copy survives an edit in place as well
    rewrite(small_data["train"], in_place=mode == "copy")
    rewrite(small_data["eval"], in_place=mode == "copy")
    proc = check(dstrain("resume", str(run_dir / "checkpoints/step-00000002"), cwd=tmp_path))
    notices = [line for line in proc.stdout.splitlines() if "changed since the run began" in line]
    assert len(notices) == 1, proc.stdout[-3000:]
    assert notices[0].startswith("warning: data.train and data.eval changed since the run began (")
    assert notices[0].endswith(
        f"resuming on the run's data snapshot in {run_dir / 'data_snapshot'} (data.snapshot={mode})"
    )

    assert losses(run_dir) == rows  # bitwise, each step once
    resumed = load_file(str(run_dir / "checkpoints/step-00000004/adapter_model.safetensors"))
    assert [k for k in final if not torch.equal(final[k], resumed[k])] == []

    info = summary(run_dir / "checkpoints/step-00000004", [])
    assert info["snapshot"] == {"mode": mode, "dir": str(run_dir / "data_snapshot"), "files": 2, "intact": 2}
    if mode == "copy":
        export_checkpoint(run_dir, tmp_path / "adapter", merge=False)
        assert not [p for p in (tmp_path / "adapter").rglob("*") if p.suffix == ".jsonl"]
