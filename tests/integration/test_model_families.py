"""The model-family matrix: every family in tests/families.py trains at the defaults against its own logits.

Each family is a tiny random-init model written by transformers (its own config class, transforms set to
non-neutral values), trained by a real `python -m dstrain.train` with default model settings. Checked
against references dstrain did not write:
- the step-0 eval loss and the first step's loss equal the model's own transformers loss (`labels=`) on
  the same tokens, rel 1e-5 in fp32;
- the loss falls over a few steps on one repeated record;
- the saved adapter, loaded by `PeftModel.from_pretrained`, reproduces the last eval loss of the live run;
- `export --merge` loads in `AutoModelForCausalLM` and gives the adapted model's logits;
- one generation eval runs (greedy decoding through the model's own forward).
QLoRA: one optimizer step of each dense family in 4-bit, through dstrain's model build and head.
Two rows are adapter variants on a plain family (DoRA, PiSSA): the same checks with their lora keys; the
PiSSA row's adapter is the converted plain LoRA that PEFT loads onto the original base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dstrain.checkpoint.export import export_checkpoint
from dstrain.config.demo import asset
from dstrain.config.run import DataConfig, LoraConfig, ModelConfig
from dstrain.data.batches import tokenize_record
from dstrain.data.records import parse_text
from dstrain.model.build import build_model, load_tokenizer
from dstrain.model.supervised import SupervisedLM
from tests.families import DATA_LIMITS, FAMILIES, own_loss, repeated_record_files, write_family
from tests.helpers import REPO, check, metrics, train_single, write_config

DATA = DataConfig(**DATA_LIMITS)
REL = 1e-5


def first_record() -> str:
    return Path(asset("data", "sft_rag_train.jsonl")).read_text(encoding="utf-8").splitlines()[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return repeated_record_files(tmp_path_factory.mktemp("family-data"))


def fast_zero2(tmp_path: Path) -> Path:
    """The shipped ZeRO-2 JSON with a learning rate that moves a tiny model in a few steps."""
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["optimizer"]["params"]["lr"] = 1e-2
    ds["scheduler"]["params"]["warmup_num_steps"] = 1
    path = tmp_path / "zero2-fast.json"
    path.write_text(json.dumps(ds))
    return path


def train_family(tmp_path: Path, files: dict[str, Path], name: str) -> tuple[Path, Path]:
    model_dir = write_family(name, tmp_path / "model")
    config = write_config(
        tmp_path,
        files,
        model={"path": str(model_dir)},  # every other model setting at its default
        lora={"r": 8, "alpha": 16, "dropout": 0.0, **FAMILIES[name].lora},
        data=DATA_LIMITS,
        train={
            "max_steps": 6,
            "eval_every": 6,
            "save_every": 0,
            "global_batch_size": 4,
            "eval_generate": 2,
            "eval_max_new_tokens": 4,
        },
        ds_config=str(fast_zero2(tmp_path)),
    )
    proc = check(train_single(config, cwd=tmp_path))
    assert "log-probs: chunked head" in proc.stdout + proc.stderr
    return model_dir, tmp_path / "run"


def close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_against_its_own_logits(tmp_path, files, name):
    model_dir, run_dir = train_family(tmp_path, files, name)
    rows = metrics(run_dir)
    evals = [r for r in rows if "eval_loss" in r]
    steps = [r for r in rows if "loss" in r]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    assert close(evals[0]["eval_loss"], own_loss(base, model_dir, files["eval"])), (name, evals[0])
    assert close(steps[0]["loss"], own_loss(base, model_dir, files["train"])), (name, steps[0])
    # Granite's and Cohere's scaled-down logits learn slowly; any fall well above rounding will do
    assert steps[-1]["loss"] < steps[0]["loss"] - 1e-3, [r["loss"] for r in steps]
    assert "eval_exact_match" in evals[-1] and "eval_token_f1" in evals[-1]

    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    adapted = PeftModel.from_pretrained(base, str(ckpt)).eval()
    assert close(own_loss(adapted, model_dir, files["eval"]), evals[-1]["eval_loss"]), name

    merged_dir = tmp_path / "merged"  # export_checkpoint returns the checkpoint it used, not this dir
    export_checkpoint(ckpt, merged_dir, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.randint(4, 2048, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


DENSE = [name for name, family in FAMILIES.items() if family.four_bit]


@pytest.mark.parametrize("name", DENSE)
def test_qlora_step_for_each_dense_family(tmp_path, name):
    """The 4-bit base through dstrain's build and head: one step changes the adapter and lowers the loss."""
    model_dir = write_family(name, tmp_path / "model")
    cfg = ModelConfig(path=str(model_dir), load_in_4bit=True)
    model = build_model(cfg, LoraConfig(r=4, alpha=8, dropout=0.0, **FAMILIES[name].lora), zero_stage=2)
    lm = SupervisedLM(model, logits_chunk_tokens=16).train()
    tokenizer = load_tokenizer(cfg)
    example = tokenize_record(tokenizer, parse_text(first_record(), "sft-rag"), DATA)
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        nll, n = lm(ids, torch.ones_like(ids), labels)
        loss = nll / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert torch.isfinite(torch.tensor(losses)).all() and losses[1] < losses[0], losses
    quantized = json.loads((model_dir / "config.json").read_text()).get("model_type")
    assert quantized == FAMILIES[name].model_type
