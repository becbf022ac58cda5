"""`dstrain eval` on one process: a DPO checkpoint (ZeRO-2) scored again gives the logged eval loss, preference
accuracy and margin; `--json` prints one object; what a user can get wrong is one clear message.
(tests/distributed/test_plan_and_eval_two_ranks.py: SFT on 2 ranks, generation, exported adapters and models.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dstrain.config.demo import asset
from dstrain.errors import DstrainError
from dstrain.eval.command import evaluate_source, parse_args
from tests.helpers import assert_clean_failure, check, dstrain, metrics, subset, train_single, write_config

STEPS = 4


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval-dpo")
    files = {
        "train": subset(asset("data", "preference_train.jsonl"), tmp / "train.jsonl", 64),
        "eval": subset(asset("data", "preference_eval.jsonl"), tmp / "eval.jsonl", 16),
    }
    # alpha 64: four steps (two of them at LR 0) move the margins off zero
    config = write_config(
        tmp,
        files,
        lora={"r": 8, "alpha": 64, "dropout": 0.0},
        data={"format": "preference"},
        objective={"name": "dpo"},
        train={"max_steps": STEPS, "eval_every": 2, "save_every": STEPS},
    )
    check(train_single(config, cwd=tmp))
    return {"tmp": tmp, "run": tmp / "run", **files}


def test_dpo_checkpoint_reproduces_the_logged_preference_eval(dpo_run):
    proc = check(
        dstrain("eval", str(dpo_run["run"]), "--data", str(dpo_run["eval"]), "--json", cwd=dpo_run["tmp"])
    )
    report = json.loads(proc.stdout)  # the one object on stdout, library chatter on stderr
    logged = next(r for r in metrics(dpo_run["run"]) if r["step"] == STEPS and "eval_loss" in r)
    assert report["source"]["kind"] == "checkpoint" and report["source"]["step"] == STEPS
    assert report["source"]["objective"]["name"] == "dpo" and report["records"] == 16
    assert logged["eval_reward_margin"] != 0.0  # the adapter moved: the numbers below mean something
    for key in ("eval_loss", "eval_pref_acc", "eval_reward_margin"):
        assert report["metrics"][key] == pytest.approx(logged[key], rel=1e-5), key
    written = dpo_run["run"] / "checkpoints" / f"step-{STEPS:08d}.eval-eval.json"
    assert json.loads(written.read_text())["metrics"] == report["metrics"]  # next to the checkpoint


def test_mistakes_are_one_clear_message(dpo_run, tmp_path: Path):
    tmp, run = dpo_run["tmp"], str(dpo_run["run"])
    assert_clean_failure(
        dstrain("eval", "no-such-run", "--data", str(dpo_run["eval"]), cwd=tmp), "no-such-run: no such file"
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "q", "retrieval_result": [], "chosen": "a"\n', encoding="utf-8")
    assert_clean_failure(
        dstrain("eval", run, "--data", str(broken), cwd=tmp), "broken.jsonl:1:", "1 bad record"
    )
    # sft-rag records read as the run's preference format: each one lacks a field, and --format is named
    sft = subset(asset("data", "sft_rag_eval.jsonl"), tmp_path / "sft.jsonl", 4)
    assert_clean_failure(
        dstrain("eval", run, "--data", str(sft), cwd=tmp), "sft.jsonl:1:", "is --format right"
    )


def test_a_merged_model_has_no_reference_for_preference_metrics(tmp_path: Path):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"model_type": "llama", "dtype": "float32"}', encoding="utf-8")
    pairs = subset(asset("data", "preference_eval.jsonl"), tmp_path / "pairs.jsonl", 2)
    args = parse_args([str(merged), "--data", str(pairs), "--format", "preference"])
    with pytest.raises(DstrainError, match="merged model: preference metrics compare it with the base"):
        evaluate_source(args)
