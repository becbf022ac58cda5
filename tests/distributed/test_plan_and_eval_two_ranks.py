"""One real 2-rank run (started by torchrun, ZeRO-2, gloo on CPU), planned by `dstrain train --dry-run` before
it starts and scored by `dstrain eval` after it ends: the plan's numbers are the ones the run printed and
logged, and eval reproduces the logged eval metrics from the checkpoint, the exported adapter and the merged
model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dstrain.checkpoint.export import export_checkpoint
from dstrain.eval.command import main as eval_main
from dstrain.model.memory import gib
from tests.helpers import check, dstrain, make_small_data, metrics, train_ranks, write_config
from tests.unit.checkpoint.test_sizing import TOLERANCE_BYTES

pytestmark = pytest.mark.distributed

STEPS = 8
# metrics.jsonl's `lr` is the LR of that step's own update, as the dry run gives it.
LOGGED_LR_OFFSET = 0
# Ranks shard the eval set (every 2nd record each), one process takes it whole: the same token-weighted sums
# in another padding and summation order. Measured: 1.2e-8 relative for the adapter and for the merged model
# (2-rank eval: bitwise); the contract is 1e-5.
REL = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The dry run's JSON for 2 ranks (taken first: it must leave no run dir), then the 2-rank run itself."""
    tmp = tmp_path_factory.mktemp("plan-eval")
    files = make_small_data(tmp)
    train = {
        "max_steps": STEPS,
        "eval_every": 4,
        "save_every": 4,
        "eval_generate": 16,
        "eval_max_new_tokens": 8,
    }
    config = write_config(tmp, files, train=train)
    dry = check(dstrain("train", "--config", str(config), "--dry-run", "--num-gpus", "2", "--json", cwd=tmp))
    assert not (tmp / "run").exists()
    proc = check(train_ranks(config, cwd=tmp))
    return {"tmp": tmp, "files": files, "plan": json.loads(dry.stdout), "stdout": proc.stdout}


def test_the_dry_run_plans_what_the_run_does(run):
    plan, memory, out = run["plan"]["plan"], run["plan"]["memory"], run["stdout"]
    said = re.search(
        r"world (\d+), global batch (\d+) = micro (\d+) x accumulation (\d+) x world (\d+), (\d+) train / (\d+) "
        r"eval samples, (\d+) steps",
        out,
    )
    assert said, out
    expected = (
        run["plan"]["launch"]["world"],
        plan["global_batch"],
        plan["micro"],
        plan["accumulation"],
        plan["data_parallel"],
        plan["train_samples"],
        run["plan"]["data"]["eval_records"],
        plan["total_steps"],
    )
    assert tuple(map(int, said.groups())) == expected == (2, 8, 4, 1, 2, 64, 16, STEPS)
    # every memory term the run printed at start-up, byte for byte as the table shows it
    for term in memory["terms"]:
        if term["bytes"]:
            assert re.search(
                rf"{re.escape(term['name'])}\s+│\s+\S+\s+│\s+{re.escape(gib(term['bytes']))}", out
            )
    assert re.search(rf"total device\s+│\s+│\s+{re.escape(gib(memory['totals']['device']))} of", out)
    assert re.search(
        rf"model build \(before ZeRO moves it\)\s+│\s+host\s+│\s+{re.escape(gib(memory['build_peak']))}", out
    )
    rows = metrics(run["tmp"] / "run")
    planned_lr = {row["step"]: row["lr"] for row in plan["lr"]}
    compared = [r["step"] for r in rows if "lr" in r and r["step"] + LOGGED_LR_OFFSET in planned_lr]
    assert len(compared) >= 4, (planned_lr, compared)
    for row in (r for r in rows if r.get("step") in compared and "lr" in r):
        assert row["lr"] == pytest.approx(planned_lr[row["step"] + LOGGED_LR_OFFSET], rel=1e-12, abs=0)
    assert sorted({r["step"] for r in rows if "eval_loss" in r}) == plan["eval_steps"] == [0, 4, 8]
    saved = sorted(int(p.name.split("-")[1]) for p in (run["tmp"] / "run" / "checkpoints").glob("step-*"))
    assert saved == plan["save_steps"] == [4, 8]
    # the disk row: one checkpoint as the run wrote it, within the estimate's stated bound
    written = run["tmp"] / "run" / "checkpoints" / f"step-{STEPS:08d}"
    actual = sum(p.stat().st_size for p in written.iterdir() if p.is_file())
    assert abs(memory["checkpoint_bytes"] - actual) <= TOLERANCE_BYTES, (memory["checkpoint_bytes"], actual)


def logged_at(run_dir: Path, step: int) -> dict:
    return next(r for r in metrics(run_dir) if r["step"] == step and "eval_loss" in r)


def test_eval_on_two_ranks_reproduces_the_logged_metrics(run):
    tmp = run["tmp"]
    out = tmp / "two-ranks.json"
    args = ["eval", "run", "--data", str(run["files"]["eval"]), "--generate", "16", "--num-gpus", "2"]
    check(dstrain(*args, "--out", str(out), cwd=tmp))
    report = json.loads(out.read_text())
    logged = logged_at(tmp / "run", STEPS)
    assert (
        report["world_size"] == 2
        and report["source"]["step"] == STEPS
        and report["logged"] == {k: v for k, v in logged.items() if k.startswith("eval_")}
    )
    # the same shards, batches and generation calls as the run's own eval: the same numbers
    assert report["metrics"]["eval_loss"] == pytest.approx(logged["eval_loss"], rel=REL)
    assert report["metrics"]["eval_token_f1"] == logged["eval_token_f1"] > 0  # some answers overlap
    assert report["metrics"]["eval_exact_match"] == logged["eval_exact_match"]


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_eval_of_an_export_reproduces_the_logged_eval_loss(run, merge: bool, tmp_path: Path):
    tmp = run["tmp"]
    exported = tmp_path / ("merged" if merge else "adapter")
    export_checkpoint(tmp / "run", exported, merge)
    out = tmp_path / "report.json"
    # the run's config.yaml supplies what an export does not carry: data settings, dtype, head
    args = [str(exported), "--data", str(run["files"]["eval"]), "--config", str(tmp / "run" / "config.yaml")]
    assert eval_main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["source"]["kind"] == ("merged model" if merge else "adapter") and report["world_size"] == 1
    assert report["metrics"]["eval_loss"] == pytest.approx(
        logged_at(tmp / "run", STEPS)["eval_loss"], rel=REL
    )
