"""ORPO and KTO in real one-process runs, against transformers' own forward of the same model (the reference
nobody here wrote; the loss formulas are written out here, not taken from dstrain):

- ORPO: the step-1 loss of 8 pairs in one global batch (micro 2 x accumulation 4, normalised over the global
  batch) is the chosen answers' NLL per chosen token minus beta x the mean log sigmoid(log odds ratio).
- KTO on unpaired kto records: step 1 is exact (policy = reference: every loss is w/2); step 2's loss, with the
  reference point estimated on mismatched answers over both micro batches, is the formula on the step-1
  adapter loaded by PEFT.
- KTO on a preference file: each pair gives one desirable and one undesirable example, said at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.test_loss_normalization import answer_logps, ds_json, reference_model, words
from tests.helpers import check, metrics, train_single, write_config

BETA = 0.1
WEIGHTS = (2.0, 0.5)  # KTO's desirable_weight, undesirable_weight
LENGTHS = (1, 3, 8, 20, 35, 60, 5, 12)  # answer lengths in words: 8 pairs of very different lengths
LABELS = (True, False, True, True, False, True, False, True)  # the kto records' labels: 5 desirable, 3 not


def pairs() -> list[dict]:
    return [
        {
            "query": words(4 + i, i),
            "retrieval_result": [words(12, 2 * i), words(6, i + 5)],
            "chosen": words(length, i + 1),
            "rejected": words(max(1, 60 - length), i + 7),
        }
        for i, length in enumerate(LENGTHS)
    ]


def kto_records() -> list[dict]:
    """One answer per record, labelled: the pair's chosen answer where desirable, its rejected one where not."""
    return [
        {
            "query": p["query"],
            "retrieval_result": p["retrieval_result"],
            "answer": p["chosen"] if label else p["rejected"],
            "label": label,
        }
        for p, label in zip(pairs(), LABELS, strict=True)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train(tmp_path: Path, name: str, rows: list[dict], fmt: str, objective: dict, micro: int, steps: int):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    config = write_config(
        tmp_path,
        {"train": data, "eval": data},
        name=name,
        data={"eval": [], "format": fmt, "max_seq_len": 128, "max_passage_tokens": 48},
        objective={"beta": BETA, **objective},
        train={"max_steps": steps, "log_every": 1, "save_every": 1},
        ds_config=str(ds_json(tmp_path, micro)),
    )
    proc = check(train_single(config, cwd=tmp_path))
    return proc, [r for r in metrics(tmp_path / name) if "loss" in r]


def tokenized(rows: list[dict]) -> tuple[list, int]:
    """Each record as a pair of rows (first answer, second answer) after its prompt, as training tokenises."""
    from dstrain.config.run import DataConfig, ModelConfig
    from dstrain.data.pairs import tokenize_pair
    from dstrain.data.records import parse_record
    from dstrain.model.build import load_tokenizer

    tokenizer, cfg = load_tokenizer(ModelConfig()), DataConfig(max_seq_len=128, max_passage_tokens=48)
    return [
        tokenize_pair(tokenizer, parse_record(r, "preference"), cfg) for r in rows
    ], tokenizer.pad_token_id


def logps(model, rows: list, pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    return answer_logps(model, [getattr(r, side)() for r in rows], pad)


def test_orpo_step1_loss_is_the_formula_on_transformers_forward(tmp_path: Path):
    _, rows = train(tmp_path, "orpo", pairs(), "preference", {"name": "orpo"}, micro=2, steps=1)
    examples, pad = tokenized(pairs())
    with torch.no_grad():
        model = reference_model()
        chosen, n_chosen = logps(model, examples, pad, "chosen")
        rejected, n_rejected = logps(model, examples, pad, "rejected")
    mean_c, mean_r = chosen / n_chosen, rejected / n_rejected  # per-token mean log-probs: log p
    log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
    nll = -chosen.sum() / n_chosen.sum()
    want = nll - BETA * F.logsigmoid(log_odds).mean()
    got = rows[0]
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["nll_loss"] == pytest.approx(float(nll), rel=1e-5)
    assert got["log_odds"] == pytest.approx(float(log_odds.mean()), rel=1e-5, abs=1e-6)
    assert got["reward_margin"] == pytest.approx(float(BETA * (mean_c - mean_r).mean()), rel=1e-5, abs=1e-6)


def kto_loss_on_adapter(adapter: Path) -> tuple[float, float]:
    """KTO's loss and reference point over the 8 kto records, the step-1 adapter on the base model: each
    record's prompt beside the answer of record (r + 4) mod 8 (half the data away) estimates z0."""
    from peft import PeftModel

    from dstrain.config.run import ModelConfig
    from dstrain.model.build import load_base_model

    records = kto_records()
    mismatched = [{**r, "chosen": r["answer"], "rejected": records[(i + 4) % 8]["answer"]}
                  for i, r in enumerate(records)]  # fmt: skip
    examples, pad = tokenized(mismatched)
    model = PeftModel.from_pretrained(load_base_model(ModelConfig()), str(adapter)).eval()
    with torch.no_grad():
        policy, _ = logps(model, examples, pad, "chosen")
        policy_kl, _ = logps(model, examples, pad, "rejected")
        with model.disable_adapter():
            reference, _ = logps(model, examples, pad, "chosen")
            reference_kl, _ = logps(model, examples, pad, "rejected")
    z0 = max(0.0, float((policy_kl - reference_kl).mean()))
    ratio = policy - reference
    desirable = torch.tensor(LABELS)
    losses = torch.where(
        desirable,
        WEIGHTS[0] * (1 - torch.sigmoid(BETA * (ratio - z0))),
        WEIGHTS[1] * (1 - torch.sigmoid(BETA * (z0 - ratio))),
    )
    return float(losses.mean()), z0


def test_kto_on_unpaired_records_follows_the_formula(tmp_path: Path):
    objective = {"name": "kto", "desirable_weight": WEIGHTS[0], "undesirable_weight": WEIGHTS[1]}
    proc, rows = train(tmp_path, "kto", kto_records(), "kto", objective, micro=4, steps=2)
    assert "kto: 8 labelled examples" in proc.stdout + proc.stderr
    # step 1: LoRA B starts at zero, so the policy is the reference: every log-ratio and z0 are 0, and each
    # example's loss is w x (1 - sigmoid(0)) = w / 2
    desirable = sum(LABELS)
    step1 = (desirable * WEIGHTS[0] + (8 - desirable) * WEIGHTS[1]) / 2 / 8
    assert rows[0]["loss"] == pytest.approx(step1, abs=1e-6)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    want, z0 = kto_loss_on_adapter(tmp_path / "kto" / "checkpoints" / "step-00000001")
    # desirable answers weigh 4x the undesirable ones: step 1 raises answers overall, so z0 is not clamped
    assert z0 > 0.1 and rows[1]["kl"] == pytest.approx(z0, rel=1e-4)
    assert rows[1]["loss"] == pytest.approx(want, rel=1e-5)
    assert rows[1]["rewards_chosen"] != 0.0 and rows[1]["rewards_rejected"] != 0.0


def test_kto_on_a_preference_file_gives_one_example_of_each_label_per_pair(tmp_path: Path):
    objective = {"name": "kto", "desirable_weight": WEIGHTS[0], "undesirable_weight": WEIGHTS[1]}
    proc, rows = train(tmp_path, "kto-pairs", pairs()[:4], "preference", objective, micro=8, steps=1)
    said = "kto: each of the 4 preference pairs gives one desirable (chosen) and one undesirable (rejected) "
    assert said + "example: 8 examples" in proc.stdout + proc.stderr
    assert rows[0]["loss"] == pytest.approx((4 * WEIGHTS[0] + 4 * WEIGHTS[1]) / 2 / 8, abs=1e-6)
