"""`dstrain train --dry-run` plans runs far bigger than this machine in one process, and leaves nothing behind:
a 16-rank hostfile config and a 2-rank ZeRO-3 config exit 0 with the plan and the memory per rank, and no
run dir. (tests/distributed/test_plan_and_eval_two_ranks.py checks its numbers against a real 2-rank run.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain.errors import DstrainError
from dstrain.model.memory import gib
from dstrain.training.dry_run import dry_run
from dstrain.training.plan import launch_world
from tests.helpers import REPO, assert_clean_failure, check, dstrain, make_small_data, write_config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    # output_dir two levels down: neither level may appear
    data = make_small_data(tmp_path)
    return write_config(
        tmp_path, data, output_dir=str(tmp_path / "runs" / "big"), train={"global_batch_size": 64}
    )


def test_a_16_rank_hostfile_plan_in_one_process_writes_nothing(config: Path, tmp_path: Path):
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = check(
        dstrain(
            "train",
            "--config",
            str(config),
            "--dry-run",
            "--hostfile",
            str(REPO / "hostfiles" / "a100"),
            cwd=tmp_path,
        )
    )
    assert "world 16 (hostfile" in proc.stdout and "2 host(s), 16 ranks" in proc.stdout
    assert "64 = micro 4 x accumulation 1 x world 16" in proc.stdout
    assert "estimated memory per rank" in proc.stdout and "total device" in proc.stdout
    assert "nothing was trained or written" in proc.stdout
    assert "per checkpoint; at most" in proc.stdout  # the disk row (its bytes: the 2-rank plan-and-eval test)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no runs/big


def test_a_zero3_plan_shards_the_base_and_gathers_a_layer(config: Path, tmp_path: Path, capsys):
    flags = (2, None, None)
    assert dry_run(config, ["train.global_batch_size=8"], "ds_configs/zero3.json", flags, as_json=True) == 0
    zero3 = json.loads(capsys.readouterr().out)
    assert dry_run(config, ["train.global_batch_size=8"], None, flags, as_json=True) == 0
    zero2 = json.loads(capsys.readouterr().out)
    terms = {
        name: {t["name"]: t["bytes"] for t in report["memory"]["terms"]}
        for name, report in (("2", zero2), ("3", zero3))
    }
    assert zero3["ds_config"]["zero_optimization"]["stage"] == 3 and zero3["launch"]["world"] == 2
    assert (
        terms["3"]["base weights (frozen)"] * 2 == terms["2"]["base weights (frozen)"]
    )  # split over 2 ranks
    assert "ZeRO-3 gathered layer" in terms["3"] and "ZeRO-3 gathered layer" not in terms["2"]
    assert zero3["plan"]["global_batch"] == 8 and zero3["plan"]["total_steps"] == 4
    assert not (tmp_path / "runs").exists()
    assert gib(zero3["memory"]["totals"]["device"])  # a number the text table shows


def test_dry_run_errors_are_one_clear_message(config: Path, tmp_path: Path):
    # 16 ranks x micro 4 cannot make the configured global batch of 8
    bad = dstrain(
        "train",
        "--config",
        str(config),
        "--dry-run",
        "--world-size",
        "16",
        "--set",
        "train.global_batch_size=8",
        cwd=tmp_path,
    )
    assert_clean_failure(bad, "batch sizes do not add up", "world size 16")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(DstrainError, match="--hostfile nowhere: no such file"):
        launch_world(None, Path("nowhere"), None)
    with pytest.raises(DstrainError, match="--world-size stands for --num-gpus/--hostfile"):
        launch_world(2, None, 16)
