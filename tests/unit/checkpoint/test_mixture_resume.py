"""Resuming a mixture (checkpoint/mixture_resume.py): the same sources continue the recorded plan; changed
weights start a new plan at the step from each source's position, said in one note; what a source reads
cannot change under its name, nor a plain list become a mixture."""

from __future__ import annotations

import pytest

from dstrain.checkpoint.mixture_resume import check_same_sources, plan_origin
from dstrain.checkpoint.state import TrainerState
from dstrain.config.run import config_from_dict
from dstrain.config.sources import sources_of
from dstrain.data.mixture import MixturePlan, Origin, SourceSpan
from dstrain.data.sources import Mixture
from dstrain.errors import DataError

TRAIN = [{"path": "rag.jsonl", "weight": 3}, {"path": "general.jsonl", "format": "messages"}]


def saved(**origin) -> TrainerState:
    entries = [
        {"name": "rag", "weight": 3.0, "format": "sft-rag", "max_samples": 0, "epochs": 0, "records": 40,
         "samples": 30, "epoch": 0, "cursor": 30, "tokens": 900, "files": []},
        {"name": "general", "weight": 1.0, "format": "messages", "max_samples": 0, "epochs": 0, "records": 7,
         "samples": 10, "epoch": 1, "cursor": 3, "tokens": 400, "files": []},
    ]  # fmt: skip
    return TrainerState(step=5, sources=entries, mixture_origin=origin)


def cfg(train: list) -> object:
    return config_from_dict({"data": {"train": train}})


def test_the_same_sources_continue_the_recorded_plan():
    assert plan_origin(saved(), cfg(TRAIN)) == (Origin(0, ()), [])
    earlier = saved(step=2, drawn={"rag": 6, "general": 2})
    assert plan_origin(earlier, cfg(TRAIN)) == (Origin(2, (6, 2)), [])
    assert plan_origin(TrainerState(), cfg(["a.jsonl"])) == (None, [])


def test_new_weights_start_a_new_plan_from_each_source_s_position():
    changed = [
        {"path": "rag.jsonl", "weight": 1},
        {"path": "general.jsonl", "format": "messages"},
        {"path": "new.jsonl"},
    ]
    origin, (note,) = plan_origin(saved(), cfg(changed))
    assert origin == Origin(5, (30, 10, 0))
    assert note.startswith(
        "data.train changed on resume (rag weight 3 -> 1; new added (weight 1, from its first record)):"
    )
    assert "rag at record 30 of its epoch 0, general at record 3 of its epoch 1" in note


@pytest.mark.parametrize(
    ("train", "needle"),
    [
        (
            [{"path": "rag.jsonl", "weight": 3, "format": "messages"}, TRAIN[1]],
            "rag: format sft-rag -> messages",
        ),
        ([{"path": "rag.jsonl", "weight": 3, "max_samples": 5}, TRAIN[1]], "rag: max_samples 0 -> 5"),
        (["rag.jsonl", "general.jsonl"], "was a mixture when the checkpoint was written and is a plain list"),
    ],
)
def test_what_a_source_reads_cannot_change(train, needle):
    with pytest.raises(DataError, match=needle.replace("(", r"\(")):
        plan_origin(saved(), cfg(train))
    with pytest.raises(DataError, match="was a plain list when the checkpoint was written and is a mixture"):
        plan_origin(TrainerState(), cfg(TRAIN))


def test_a_kept_source_must_have_its_records():
    config = cfg(TRAIN)
    spans = [SourceSpan("rag", 0, 40, 3.0), SourceSpan("general", 40, 8, 1.0)]
    mixture = Mixture(sources_of(config.data), spans, MixturePlan(spans, 4), [[], []])
    with pytest.raises(DataError, match="source general: 7 usable records when saved, 8 now"):
        check_same_sources(saved(), mixture, [[], []])
