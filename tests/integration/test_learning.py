"""Training makes the model better, not only the loss lower: on the generated retrieval-grounded task
(dstrain/data/synthetic.py, answers readable only from the passages), real `dstrain train` runs of the bundled tiny
model raise held-out greedy exact match from 0 (SFT), held-out preference accuracy from chance (DPO with
the chosen-answer NLL term), and, on the SFT run's `export --merge` as base and reference (TRL's recipe), the
held-out desirable-minus-undesirable reward margin from 0 (KTO on unpaired records). Fixed seeds;
bench/learning_bench.py records the curves, plain DPO's included (BENCHMARKS.md: it gets there too, but after
~1,500 steps, too slow for the suite); bench/learning_spread.py their spread over seeds and CPU kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dstrain.config.run import ModelConfig
from dstrain.data.synthetic import TaskSpec, run_config, write_task
from dstrain.model.build import load_tokenizer
from tests.helpers import check, dstrain, metrics

# 1,500 SFT and 800 DPO steps: the longest single-process tests (minutes each), outside the inner loop's tier.
# numerics: where they land moves with the CPU's kernels; slow keeps them out of CI's second pass under
# another kernel set (README, Tests), bench/learning_spread.py measures that spread instead.
pytestmark = [pytest.mark.slow, pytest.mark.numerics]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    spec = TaskSpec(train=SFT_STEPS * 16, eval=100)
    return write_task(tmp_path_factory.mktemp("task"), load_tokenizer(ModelConfig()), spec)


SFT_STEPS = 1500
DPO_STEPS = 800
KTO_STEPS = 200
SFT_BAR = 0.5  # held-out exact match (bench/learning_spread.py's BARS read these three)
DPO_BAR = 0.6  # held-out preference accuracy
KTO_BAR = 0.5  # held-out reward margin


def run(
    tmp_path: Path, objective: str, files: dict[str, Path], steps: int, base: str = "builtin:tiny"
) -> list[dict]:
    cfg = run_config(objective, files, tmp_path / objective, steps, eval_every=steps // 5, model_path=base)
    path = tmp_path / f"{objective}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    check(dstrain("train", "--config", str(path), cwd=tmp_path))
    return [row for row in metrics(tmp_path / objective) if "eval_loss" in row]


@pytest.fixture(scope="module")
def sft(tmp_path_factory, task) -> tuple[Path, list[dict]]:
    """The SFT run (its dir and eval rows): the SFT check asserts on it, the KTO check starts from it."""
    work = tmp_path_factory.mktemp("sft")
    return work / "sft", run(work, "sft", task, SFT_STEPS)


def test_sft_raises_heldout_exact_match(sft):
    _, evals = sft
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == SFT_STEPS
    assert first["eval_exact_match"] <= 0.05, first  # the base model does not answer in this format
    # Bar from bench/learning_spread.py (BENCHMARKS.md, "Learning spread"): 5 seeds x 2 kernel sets here, 9 of
    # 10 runs at 0.96-1.00, the AVX-512 machine 0.68-0.75 under three kernel sets; one run in ten
    # here never left the plateau (0.01, eval loss 3.37 from 9.24): a failure of this bar means that.
    assert last["eval_exact_match"] >= SFT_BAR, evals
    assert last["eval_token_f1"] >= last["eval_exact_match"]


def test_dpo_raises_heldout_preference_accuracy(tmp_path, task):
    evals = run(tmp_path, "dpo_nll", task, DPO_STEPS)
    first, last = evals[0], evals[-1]
    # adapter-disabled reference: at step 0 every margin is exactly 0, so no pair counts as preferred yet
    assert first["eval_pref_acc"] == 0.0 and first["eval_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert last["step"] == DPO_STEPS
    # Where the 2-layer model lands at 800 steps depends on the trajectory, not on a fault (torch AdamW and
    # FusedAdam agree to 1e-6 at step 100, yet ended at 0.83 and 0.99). bench/learning_spread.py, 5 seeds x
    # 2 kernel sets: 0.77-1.00, margin 3.96-9.56 (BENCHMARKS.md, "Learning spread"); the AVX-512
    # machine 0.69. 0.6 is well below those and 2 sigma above the 0.5 of a model that prefers neither
    # answer (100 held-out pairs).
    assert last["eval_pref_acc"] >= DPO_BAR, evals
    assert last["eval_reward_margin"] > 1.0, evals


def test_kto_on_the_sft_model_raises_the_heldout_reward_margin(tmp_path, task, sft):
    """KTO from the bare tiny model collapses on this task more often than not: its first steps push every
    code down before it can tell the grounded one from the hallucinated one, and the saturated sigmoid leaves
    no gradient (BENCHMARKS.md, "KTO learning check"). TRL's recipe, KTO on an SFT model that already answers,
    with that model as the reference, is what is checked here: `dstrain export --merge` of the SFT run above."""
    sft_dir, sft_evals = sft
    assert sft_evals[-1]["eval_exact_match"] >= SFT_BAR, (
        f"the SFT run did not learn, so KTO has no base: {sft_evals}"
    )
    base = tmp_path / "sft-merged"
    check(dstrain("export", str(sft_dir), "--out", str(base), "--merge", cwd=tmp_path))
    evals = run(tmp_path, "kto", task, KTO_STEPS, base=str(base))
    first, last = evals[0], evals[-1]
    # the reference is the merged SFT model itself (adapter disabled): at step 0 policy = reference
    assert first["eval_reward_margin"] == pytest.approx(0.0, abs=1e-6), first
    assert last["step"] == KTO_STEPS
    # Bar from bench/learning_spread.py (BENCHMARKS.md, "KTO learning check"): 4 seeds x 2 kernel sets, the
    # 7 runs on a base that learned reached 1.33-1.83 at step 200; the one on the stuck base 0.30.
    assert last["eval_reward_margin"] >= KTO_BAR, evals
    assert last["eval_loss"] < first["eval_loss"], evals
