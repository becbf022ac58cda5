"""A data mixture end to end with real processes: a 3:1 SFT run over an sft-rag source and a messages source
(`dstrain convert` output), under ZeRO-3.

The reference is one uninterrupted run. Its rows carry each source's counts as the weights say (6 + 2 of
every global batch of 8), the small source runs out and restarts, max_samples limits the other. A SIGKILLed
run resumed on 1 rank logs the same rows bit for bit, and resumed on 2 ranks with the same global batch the
same counts and the same losses (summation order aside). A resume with new weights continues each source
where it stopped under the new ones, and says so. A preference objective with an SFT source is refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dstrain.config.demo import asset
from dstrain.data.convert import convert_files
from tests.helpers import REPO, assert_clean_failure, check, child_env, dstrain, metrics, subset, write_config

STEPS, MIDDLE, BATCH = 8, 4, 8
RAG_RECORDS = 30  # max_samples of the rag source's 40 records
ROW_KEYS = ("loss", "loss/rag", "loss/general", "mix/rag/samples", "mix/rag/tokens", "mix/rag/epoch",
            "mix/general/samples", "mix/general/tokens", "mix/general/epoch", "tokens", "samples")  # fmt: skip
ELASTIC_RTOL = 1e-5  # 2 ranks add the same partial sums in another order (see test_resume_zero)
HANG_GUARD_S = 300  # a hang guard, not a speed test: the run reaches its first checkpoint within seconds


def sources(rag: Path, general: Path, rag_weight: float = 3) -> list[dict]:
    return [
        {"path": str(rag), "weight": rag_weight, "max_samples": RAG_RECORDS},
        {"path": str(general), "format": "messages", "name": "general"},
    ]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mixture")


@pytest.fixture(scope="module")
def data(work: Path) -> dict[str, Path]:
    """40 sft-rag records, and the Alpaca records of the upstream fixture converted to messages (10 of its
    12 convert: two are left out with a reason)."""
    rag = subset(asset("data", "sft_rag_train.jsonl"), work / "rag.jsonl", 40)
    general = work / "alpaca_messages.jsonl"
    convert_files(
        [REPO / "tests" / "fixtures" / "upstream" / "alpaca.json"],
        "alpaca",
        "messages",
        general,
        report=lambda _: None,
    )
    return {"rag": rag, "general": general}


def config(work: Path, data: dict[str, Path], name: str) -> Path:
    return write_config(
        work,
        {"train": data["rag"], "eval": data["rag"]},
        name,
        data={"train": sources(data["rag"], data["general"]), "eval": []},
        train={
            "max_steps": STEPS,
            "log_every": 1,
            "save_every": 2,
            "keep_last": 5,
            "global_batch_size": BATCH,
        },
        ds_config="ds_configs/zero3.json",
    )


def rows(run_dir: Path) -> dict[int, dict]:
    found = [r for r in metrics(run_dir) if "loss" in r]
    assert len({r["step"] for r in found}) == len(found), "a step was logged twice"
    return {r["step"]: {k: r[k] for k in ROW_KEYS} for r in found}


def start(cfg: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dstrain.train", "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


@pytest.fixture(scope="module")
def reference(work: Path, data: dict[str, Path]) -> Path:
    proc = start(config(work, data, "reference"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert (
        "mixture over 8 steps: rag 75% of 30 records (1.60 passes); general 25% of 10 records (1.60 passes)"
        in out
    )
    return work / "reference"


def fork(run_dir: Path, name: str) -> Path:
    """A copy of the run dir as it was right after the middle checkpoint."""
    copy = run_dir.parent / name
    shutil.copytree(run_dir, copy)
    for later in range(MIDDLE + 2, STEPS + 1, 2):
        shutil.rmtree(copy / "checkpoints" / f"step-{later:08d}")
    (copy / "checkpoints" / "latest").write_text(f"step-{MIDDLE:08d}\n")
    return copy


def test_a_3_to_1_run_counts_each_source(reference: Path):
    logged = rows(reference)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, row in logged.items():
        assert (row["mix/rag/samples"], row["mix/general/samples"]) == (6 * step, 2 * step)
        assert row["mix/rag/tokens"] + row["mix/general/tokens"] == row["tokens"]
        assert row["loss/rag"] > 0 and row["loss/general"] > 0
    # the 10 general records ran out at step 5 and started their next epoch; rag (30 of 40) too
    assert [logged[s]["mix/general/epoch"] for s in (5, 6)] == [0, 1]
    assert [logged[s]["mix/rag/epoch"] for s in (5, 6)] == [0, 1]
    state = json.loads((reference / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert [(s["name"], s["samples"], s["epoch"], s["cursor"]) for s in state["sources"]] == [
        ("rag", 48, 1, 18),
        ("general", 16, 1, 6),
    ]


def test_sigkill_then_resume_equals_the_uninterrupted_run(work: Path, data: dict[str, Path], reference: Path):
    proc = start(config(work, data, "killed"))
    latest = work / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + HANG_GUARD_S
    while not (latest.is_file() and latest.read_text().strip() >= "step-00000002"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    killed_at = latest.read_text().strip()
    assert killed_at < f"step-{STEPS:08d}", "the run ended before the kill"
    check(dstrain("resume", str(work / "killed"), cwd=REPO))
    assert rows(work / "killed") == rows(reference)  # every row, each source's counts and losses: bitwise


@pytest.mark.distributed
def test_resumed_on_two_ranks_with_the_same_global_batch(reference: Path):
    copy = fork(reference, "two-ranks")
    check(dstrain("resume", str(copy), "--num-gpus", "2", cwd=REPO))
    got, want = rows(copy), rows(reference)
    assert sorted(got) == sorted(want)
    for step in range(MIDDLE + 1, STEPS + 1):
        for key in ROW_KEYS:
            if key.startswith("loss"):
                assert got[step][key] == pytest.approx(want[step][key], rel=ELASTIC_RTOL), (step, key)
            else:
                assert got[step][key] == want[step][key], (step, key)


def test_new_weights_on_resume_continue_each_source_where_it_stopped(data: dict[str, Path], reference: Path):
    copy = fork(reference, "reweighted")
    new = yaml.safe_dump(sources(data["rag"], data["general"], rag_weight=1), default_flow_style=True).strip()
    ckpt = copy / "checkpoints" / f"step-{MIDDLE:08d}"
    out = check(dstrain("resume", str(ckpt), "--set", f"data.train={new}", cwd=REPO)).stdout
    assert "data.train changed on resume (rag weight 3 -> 1): from step 4 on each global batch follows" in out
    assert "rag at record 24 of its epoch 0, general at record 8 of its epoch 0" in out
    logged = rows(copy)
    for step in range(MIDDLE + 1, STEPS + 1):  # 4 + 4 per batch from step 4 on
        assert logged[step]["mix/rag/samples"] == 24 + 4 * (step - MIDDLE)
        assert logged[step]["mix/general/samples"] == 8 + 4 * (step - MIDDLE)
    again = check(dstrain("inspect", str(copy), "--json", cwd=REPO)).stdout
    assert json.loads(again)["mixture_origin"] == {"step": 4, "drawn": {"rag": 24, "general": 8}}


def test_a_preference_objective_with_an_sft_source_is_refused(work: Path, data: dict[str, Path]):
    cfg = write_config(
        work,
        {"train": data["rag"], "eval": data["rag"]},
        "refused",
        data={
            "format": "preference",
            "train": [
                {"path": str(asset("data", "preference_train.jsonl"))},
                {"path": str(data["rag"]), "format": "sft-rag"},
            ],
            "eval": [],
        },
        objective={"name": "dpo"},
    )
    proc = dstrain("train", "--config", str(cfg), cwd=REPO)
    assert_clean_failure(proc, "objective.name 'dpo' trains on preference records; source(s) rag (sft-rag)")
    assert not (work / "refused").exists()


def test_validate_data_checks_the_run_s_sources(work: Path, data: dict[str, Path]):
    out = check(dstrain("validate-data", "--config", str(config(work, data, "validated")), cwd=REPO)).stdout
    assert (
        "data.train[0] (rag): sft-rag, weight 3: 40 records, 40 ok, 0 bad, the first 30 used (max_samples)"
        in out
    )
    assert "data.train[1] (general): messages, weight 1: 10 records, 10 ok, 0 bad" in out
    assert (
        "mixture over 8 steps: rag 75% of 30 records (1.60 passes); general 25% of 10 records (1.60 passes)"
        in out
    )
