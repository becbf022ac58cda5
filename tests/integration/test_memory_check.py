"""The memory check on real `dstrain train` processes, and the estimate against measured peak RSS growth."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

from tests.helpers import REPO, assert_clean_failure, check, dstrain, run, write_config

# Far beyond this machine: micro 4 x 1M tokens of activations for even the tiny model (~40 GiB).
ABSURD_SEQ = {"max_seq_len": 1_000_000}


def test_a_run_that_cannot_fit_stops_with_the_fixes(tmp_path, small_data):
    config = write_config(tmp_path, small_data, data=ABSURD_SEQ)
    proc = dstrain("train", "--config", str(config), cwd=tmp_path)
    assert_clean_failure(proc, "memory check", "exceeds", "activations", "zero3", "memory_check=warn")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_memory_check_warn_trains_anyway(tmp_path, small_data):
    config = write_config(tmp_path, small_data, data=ABSURD_SEQ, train={"max_steps": 1, "save_every": 0})
    proc = check(dstrain("train", "--config", str(config), "--set", "train.memory_check=warn", cwd=tmp_path))
    assert "warning: memory check" in proc.stderr
    assert "estimated memory per rank" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()


def make_model(path: Path) -> Path:
    """Random-init Llama-shaped: hidden 512, 4 layers, vocab 8192 (~34M params), the bundled tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dstrain.model.build import builtin_dir

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for item in builtin_dir("tiny").iterdir():
        if "token" in item.name or item.name.endswith(".jinja"):
            shutil.copy(item, path / item.name)
    return path


def long_records(path: Path, n: int) -> Path:
    """Records whose passages fill data.max_passage_tokens: every row reaches ~max_seq_len, the estimate's
    worst case (the bundled records are ~180 tokens and would leave most of it unused)."""
    rng = random.Random(0)
    words = ["the", "of", "river", "city", "north", "bank", "paper", "model", "light", "water"]
    rows = [
        {
            "query": f"question {i}?",
            "retrieval_result": [" ".join(rng.choices(words, k=400)) for _ in range(2)],
            "answer": " ".join(rng.choices(words, k=40)),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_estimate_is_within_2x_of_measured_peak_rss_growth(tmp_path):
    """One rank, ZeRO-2, fp32, 2 steps on rows of ~512 tokens: peak RSS growth from just before the model
    is built (VmHWM) against the estimate. Measured so far: estimate/measured 0.85 (0.76 with checkpointing);
    the rest is what glibc keeps of freed activations."""
    model = make_model(tmp_path / "model")
    data = {"train": long_records(tmp_path / "long.jsonl", 16), "eval": tmp_path / "none"}
    config = write_config(
        tmp_path,
        data,
        model={"path": str(model)},
        lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        data={"eval": [], "max_seq_len": 512, "max_passage_tokens": 400},
        train={"max_steps": 2, "save_every": 0, "global_batch_size": 4},
    )
    probe = REPO / "tests" / "integration" / "memory_probe.py"
    proc = check(run([sys.executable, str(probe), str(config)], cwd=tmp_path))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MEMORY "))
    report = json.loads(line.removeprefix("MEMORY "))
    ratio = report["estimated"] / report["measured"]
    assert 0.5 <= ratio <= 2.0, report
