"""Named eval sets in the run config: `data.eval` as a list (one unnamed set, as before) or a mapping of names
to files, set names that make metric keys, `train.best_metric` on one set, and the `--set` and YAML forms."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dstrain.config.metrics import higher_is_better, set_metric
from dstrain.config.run import dump_yaml, load_config
from dstrain.errors import ConfigError

SETS = "data.eval={rag: [rag/*.jsonl], general: general.jsonl}"


def _problems(*overrides: str, path: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.train=t.jsonl", *overrides])
    return info.value.problems


def test_a_list_stays_one_unnamed_set_and_dumps_as_before():
    cfg = load_config(None, ["data.train=t.jsonl", "data.eval=[a.jsonl, b.jsonl]"])
    assert cfg.data.eval == ["a.jsonl", "b.jsonl"]
    assert cfg.data.eval_sets() == {"": ["a.jsonl", "b.jsonl"]}
    assert "eval:\n  - a.jsonl\n  - b.jsonl\n" in dump_yaml(cfg)  # snapshots and digests unchanged
    assert load_config(None, ["data.train=t.jsonl"]).data.eval_sets() == {}


def test_a_mapping_names_the_sets_in_order_and_a_single_path_is_a_list():
    cfg = load_config(None, ["data.train=t.jsonl", SETS, "train.best_metric=eval_loss/general"])
    assert cfg.data.eval_sets() == {"rag": ["rag/*.jsonl"], "general": ["general.jsonl"]}
    assert list(cfg.data.eval) == ["rag", "general"]
    assert cfg.train.best_metric == "eval_loss/general"
    again = load_config(None, base=yaml.safe_load(dump_yaml(cfg)))
    assert again.data.eval == cfg.data.eval  # the snapshot a resume reads back


def test_a_bad_set_name_is_one_problem():
    (problem,) = _problems("data.eval={rag: r.jsonl, 'web qa': w.jsonl}")
    assert problem.startswith("data.eval: eval set name 'web qa' becomes a metric key")
    (problem,) = _problems("data.eval={rag/v2: r.jsonl}")
    assert "'rag/v2'" in problem
    (problem,) = _problems("data.eval={rag: []}")
    assert problem.startswith("data.eval.rag: no files given")


def test_a_set_given_twice_in_a_yaml_file_is_refused_with_its_line(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  train: t.jsonl\n  eval:\n    rag: a.jsonl\n    rag: b.jsonl\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:5: not valid YAML (duplicate key 'rag'")


@pytest.mark.parametrize(
    ("best", "needle"),
    [
        ("eval_los", "'eval_los' is not an eval metric (did you mean eval_loss?)"),
        ("eval_loss/rga", "data.eval has no set 'rga' (sets: rag, general); did you mean eval_loss/rag?"),
        ("eval_pref_acc/rag", "eval_pref_acc/rag needs preference eval data; use eval_loss/rag"),
        ("eval_token_f1/rag", "eval_token_f1/rag needs generated answers"),
    ],
)
def test_an_unknown_or_unproduced_best_metric_is_one_problem(best, needle):
    (problem,) = _problems(SETS, f"train.best_metric={best}")
    assert problem.startswith("train.best_metric: ") and needle in problem


def test_a_set_metric_needs_named_sets():
    (problem,) = _problems("data.eval=e.jsonl", "train.best_metric=eval_loss/rag")
    assert "names the eval set 'rag', but data.eval holds no named sets" in problem


def test_best_metric_may_name_any_metric_of_any_set():
    for metric in ("eval_loss", "eval_exact_match", "eval_token_f1"):
        cfg = load_config(
            None, ["data.train=t.jsonl", SETS, "train.eval_generate=4", f"train.best_metric={metric}/rag"]
        )
        assert cfg.train.best_metric == f"{metric}/rag"
    pref = ["data.format=preference", SETS, "train.best_metric=eval_reward_margin/general"]
    assert load_config(None, ["data.train=t.jsonl", *pref]).train.best_metric == "eval_reward_margin/general"


def test_a_set_metric_goes_the_way_of_its_metric():
    assert set_metric("eval_loss", "rag") == "eval_loss/rag" and set_metric("eval_loss", "") == "eval_loss"
    assert higher_is_better("eval_pref_acc/rag") and higher_is_better("eval_token_f1")
    assert not higher_is_better("eval_loss/rag") and not higher_is_better("eval_loss")


def test_set_takes_a_flow_mapping_but_a_template_with_colons_stays_text():
    cfg = load_config(
        None,
        ["data.train=t.jsonl", "data.eval={a: [x.jsonl]}", "data.prompt_template=Q: {query} P: {passages}"],
    )
    assert cfg.data.eval == {"a": ["x.jsonl"]}
    assert cfg.data.prompt_template == "Q: {query} P: {passages}"
    (problem,) = _problems("data.eval={a: [x.jsonl]")
    assert "not a valid YAML list/mapping" in problem
