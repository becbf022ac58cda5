"""dstrain.eval.loss.evaluate on the bundled tiny model, against the model's own transformers forward.

DeepSpeed's engine is replaced at its boundary by `StandInEngine`, which has what dstrain.engine.forward and
dstrain.engine.evaluating use (`.device`, calling it, `.eval()`, `.train()`); no process group, so the
cross-rank sums are the identity and a `rank`/`world` call scores exactly that rank's shard.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dstrain
from dstrain.config.run import DataConfig, ObjectiveConfig
from dstrain.data.batches import IGNORE, Example, tokenize_record
from dstrain.data.pairs import PairExample, tokenize_pair
from dstrain.eval.loss import evaluate, evaluate_sets
from dstrain.eval.sets import EvalSet
from dstrain.model.supervised import SupervisedLM
from tests.helpers import lora_model
from tests.unit.data.loaded import load_records
from tests.unit.standin_engine import StandInEngine

DATA = Path(dstrain.__file__).parent / "assets" / "data"
CFG = DataConfig(max_seq_len=256, max_passage_tokens=96)
REL = 1e-5  # fp32 on both sides, summed in a different order


@pytest.fixture(scope="module")
def peft_model():
    return lora_model(0.05)  # non-zero LoRA B: policy and reference (adapter disabled) must differ


@pytest.fixture
def engine(peft_model) -> StandInEngine:
    module = SupervisedLM(peft_model, logits_chunk_tokens=16)
    module.train()  # as the training loop leaves it
    return StandInEngine(module)


@pytest.fixture(scope="module")
def sft_examples(tokenizer) -> list[Example]:
    records = load_records([DATA / "sft_rag_eval.jsonl"], "sft-rag").records[:5]
    return [tokenize_record(tokenizer, record, CFG) for record in records]


@pytest.fixture(scope="module")
def pair_examples(tokenizer) -> list[PairExample]:
    records = load_records([DATA / "preference_eval.jsonl"], "preference").records[:6]
    return [tokenize_pair(tokenizer, record, CFG) for record in records]


@torch.no_grad()
def _nll(peft_model, example: Example, adapter: bool = True) -> tuple[float, int]:
    """(summed NLL, supervised tokens) of one unpadded row from the model's own logits, labels shifted."""
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
    peft_model.eval()
    if adapter:
        logits = peft_model(input_ids=ids).logits
    else:
        with peft_model.disable_adapter():
            logits = peft_model(input_ids=ids).logits
    targets = labels[0, 1:]
    nll = F.cross_entropy(logits[0, :-1].float(), targets, ignore_index=IGNORE, reduction="sum")
    return nll.item(), int((targets != IGNORE).sum())


def _margins(peft_model, pairs: list[PairExample], beta: float) -> list[float]:
    """DPO's implicit reward margin of each pair: beta * ((pc - rc) - (pr - rr)), log-probs = -NLL."""
    margins = []
    for pair in pairs:
        pc, rc = (-_nll(peft_model, pair.chosen(), adapter)[0] for adapter in (True, False))
        pr, rr = (-_nll(peft_model, pair.rejected(), adapter)[0] for adapter in (True, False))
        margins.append(beta * ((pc - rc) - (pr - rr)))
    return margins


def _run(engine: StandInEngine, examples, objective: ObjectiveConfig, **where) -> dict[str, float]:
    kwargs = {"micro": 2, "rank": 0, "world": 1, **where}
    return evaluate(engine, examples, pad_id=0, objective=objective, **kwargs)


def test_eval_loss_is_the_token_weighted_mean_nll(engine, peft_model, sft_examples):
    result = _run(engine, sft_examples, ObjectiveConfig())
    sums = [_nll(peft_model, example) for example in sft_examples]
    expected = sum(nll for nll, _ in sums) / sum(n for _, n in sums)
    assert set(result) == {"eval_loss"}
    assert result["eval_loss"] == pytest.approx(expected, rel=REL)
    # 5 examples of different lengths in micro batches of 2: padding must not count
    assert len({n for _, n in sums}) > 1 and len(engine.modes) == 3


def test_a_short_shard_is_topped_up_with_filler_that_adds_nothing(engine, peft_model, sft_examples):
    result = _run(engine, sft_examples, ObjectiveConfig(), rank=1, world=2)
    sums = [_nll(peft_model, example) for example in sft_examples[1::2]]  # 2 examples + 1 filler
    assert result["eval_loss"] == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), rel=REL)


def test_forward_runs_in_eval_mode_and_train_mode_comes_back(engine, sft_examples):
    _run(engine, sft_examples, ObjectiveConfig())
    assert engine.modes and not any(engine.modes)
    assert engine.module.training and all(m.training for m in engine.module.modules())


def test_train_mode_comes_back_when_forward_raises(engine, sft_examples, monkeypatch):
    def fail(**_):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(engine.module, "forward", fail)
    with pytest.raises(RuntimeError, match="forward failed"):
        _run(engine, sft_examples, ObjectiveConfig())
    assert engine.module.training


@pytest.mark.parametrize("share_prompt", [False, True], ids=["padded", "shared-prompt"])
def test_preference_metrics_match_a_direct_computation(engine, peft_model, pair_examples, share_prompt):
    beta = 0.5
    result = _run(
        engine, pair_examples, ObjectiveConfig(name="dpo", beta=beta), micro=4, share_prompt=share_prompt
    )
    margins = _margins(peft_model, pair_examples, beta)
    assert min(abs(m) for m in margins) > 1e-4, "a margin this close to 0 could flip sign on rounding"
    accuracy = sum(m > 0 for m in margins) / len(margins)
    assert 0 < accuracy < 1, "want pairs on both sides: an all-right or all-wrong count proves little"
    assert 0.0 <= result["eval_pref_acc"] <= 1.0
    assert result["eval_pref_acc"] == pytest.approx(accuracy)
    assert result["eval_reward_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-6)
    dpo = sum(-F.logsigmoid(torch.tensor(m, dtype=torch.float64)).item() for m in margins) / len(margins)
    assert result["eval_loss"] == pytest.approx(dpo, rel=1e-5)


def test_sft_on_pairs_reports_the_chosen_answers_nll_per_token(engine, peft_model, pair_examples):
    objective = ObjectiveConfig(name="sft")
    result = _run(engine, pair_examples, objective, micro=4, rank=2, world=4)
    (pair,) = pair_examples[2::4]  # 6 pairs over 4 ranks: this one and a filler pair without answers
    nll, tokens = _nll(peft_model, pair.chosen())
    assert result["eval_loss"] == pytest.approx(nll / tokens, rel=REL)
    (margin,) = _margins(peft_model, [pair], objective.beta)
    assert result["eval_pref_acc"] == float(margin > 0)  # the filler pair is not counted as a wrong one
    assert result["eval_reward_margin"] == pytest.approx(margin, rel=1e-4, abs=1e-6)


# -------------------------------------------------------------------------------------------- named sets


def _sets(engine, sets: dict, objective: ObjectiveConfig, **where) -> dict[str, float]:
    kwargs = {"micro": 2, "rank": 0, "world": 1, **where}
    named = [EvalSet(name, examples) for name, examples in sets.items()]
    return evaluate_sets(engine, named, pad_id=0, objective=objective, **kwargs)


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_each_named_set_equals_its_set_alone_and_the_whole_weighs_every_token(
    engine, peft_model, sft_examples, rank, world
):
    sets = {"rag": sft_examples[:2], "general": sft_examples[2:]}
    result = _sets(engine, sets, ObjectiveConfig(), rank=rank, world=world)
    assert set(result) == {"eval_loss", "eval_loss/rag", "eval_loss/general"}
    for name, examples in sets.items():
        engine.modes.clear()
        alone = _run(engine, examples, ObjectiveConfig(), rank=rank, world=world)["eval_loss"]
        assert result[f"eval_loss/{name}"] == alone
    # the whole: every token of this rank's share of each set (no process group: one rank's sums)
    sums = [_nll(peft_model, e) for examples in sets.values() for e in examples[rank::world]]
    assert result["eval_loss"] == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), rel=REL)


def test_every_rank_runs_as_many_forwards_for_each_set(engine, sft_examples):
    """ZeRO-3: a rank with a shorter shard of some set still runs that set's batch count (filler rows)."""
    sets = {"a": sft_examples[:3], "b": sft_examples[3:4]}  # 3 and 1 examples over 2 ranks, micro 1
    forwards = []
    for rank in (0, 1):
        engine.modes.clear()
        _sets(engine, sets, ObjectiveConfig(), micro=1, rank=rank, world=2)
        forwards.append(len(engine.modes))
    assert forwards == [3, 3]  # a: 2 batches, b: 1 batch, on both ranks


def test_named_preference_sets_count_pairs_over_all_sets(engine, pair_examples):
    objective = ObjectiveConfig(name="dpo", beta=0.5)
    sets = {"rag": pair_examples[:4], "general": pair_examples[4:]}
    result = _sets(engine, sets, objective, micro=4)
    alone = {name: _run(engine, examples, objective, micro=4) for name, examples in sets.items()}
    for name in sets:
        for key in ("eval_loss", "eval_pref_acc", "eval_reward_margin"):
            assert result[f"{key}/{name}"] == alone[name][key]
    # per pair over both sets: 4 pairs and 2 pairs
    for key in ("eval_loss", "eval_pref_acc", "eval_reward_margin"):
        whole = (4 * alone["rag"][key] + 2 * alone["general"][key]) / 6
        assert result[key] == pytest.approx(whole, rel=1e-12)
