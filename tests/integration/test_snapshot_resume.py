"""Data snapshots end to end (data.snapshot: link | copy): a run whose training and eval files are rewritten
after it began resumes from its snapshot bitwise, with a one-line notice; inspect shows the snapshot and
export leaves it out. Without a snapshot the resume is refused as before (tests/unit/data/test_snapshot.py).

The link run and the copy run go side by side (one process each on the 2-core CI machine: the wall time of
one), then their two resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dstrain.checkpoint.export import export_checkpoint
from dstrain.checkpoint.report import summary
from dstrain.data.snapshot import HARD_LINK_CAVEAT
from tests.helpers import VENV_BIN, check, make_small_data, metrics, run_together, write_config

TRAIN = {"max_steps": 4, "save_every": 2, "keep_last": 5, "log_every": 1}
MODES = ("link", "copy")


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


def test_a_rewritten_source_resumes_bitwise_from_its_link_or_copy_snapshot(tmp_path: Path):
    data, configs = {}, {}
    for mode in MODES:
        (tmp_path / mode).mkdir()
        data[mode] = make_small_data(tmp_path / mode)
        configs[mode] = write_config(tmp_path / mode, data[mode], data={"snapshot": mode}, train=TRAIN)
    trained = run_together(
        {m: [sys.executable, "-m", "dstrain.train", "--config", str(configs[m])] for m in MODES}, tmp_path
    )
    for proc in trained.values():
        check(proc)
    before = {}
    for mode in MODES:
        run_dir = tmp_path / mode / "run"
        snap = run_dir / "data_snapshot/train/00-train.jsonl"
        shared = snap.stat().st_ino == data[mode]["train"].stat().st_ino  # a hard link, not a reflink
        assert (f"warning: {HARD_LINK_CAVEAT}" in trained[mode].stdout) == shared
        final = load_file(str(run_dir / "checkpoints/step-00000004/adapter_model.safetensors"))
        before[mode] = (losses(run_dir), final)
        # a hard link survives a file replaced by a new one; a copy survives an edit in place as well
        for split in ("train", "eval"):
            rewrite(data[mode][split], in_place=mode == "copy")

    resume = str(VENV_BIN / "dstrain"), "resume"
    resumed = run_together(
        {m: [*resume, str(tmp_path / m / "run" / "checkpoints" / "step-00000002")] for m in MODES}, tmp_path
    )
    for proc in resumed.values():
        check(proc)
    for mode in MODES:
        run_dir = tmp_path / mode / "run"
        notices = [
            line for line in resumed[mode].stdout.splitlines() if "changed since the run began" in line
        ]
        assert len(notices) == 1, resumed[mode].stdout[-3000:]
        assert notices[0].startswith("warning: data.train and data.eval changed since the run began (")
        assert notices[0].endswith(
            f"resuming on the run's data snapshot in {run_dir / 'data_snapshot'} (data.snapshot={mode})"
        )
        recorded, final = before[mode]
        assert losses(run_dir) == recorded  # bitwise, each step once, the eval on the snapshot's eval file
        now = load_file(str(run_dir / "checkpoints/step-00000004/adapter_model.safetensors"))
        assert [k for k in final if not torch.equal(final[k], now[k])] == []
        info = summary(run_dir / "checkpoints/step-00000004", [])
        assert info["snapshot"] == {
            "mode": mode,
            "dir": str(run_dir / "data_snapshot"),
            "files": 2,
            "intact": 2,
        }

    export_checkpoint(tmp_path / "copy" / "run", tmp_path / "adapter", merge=False)
    assert not [p for p in (tmp_path / "adapter").rglob("*") if p.suffix == ".jsonl"]  # never the snapshot
