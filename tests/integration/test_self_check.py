"""The first-batch self-check stops a run whose head does not give the model's own logits, before step 1.

The model is remote code that claims a family dstrain knows (model_type "minicpm": hidden states scaled
before the head) but also multiplies its logits by 3, which the family's transform does not know.
"""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.remote_minicpm import write_remote_minicpm
from tests.helpers import assert_clean_failure, check, make_small_data, train_single, write_config


def write_config_for(tmp_path: Path, model_dir: Path, **model: object) -> Path:
    return write_config(
        tmp_path,
        make_small_data(tmp_path),
        model={"path": str(model_dir), "trust_remote_code": True, **model},
        train={"max_steps": 2, "save_every": 1, "eval_every": 0},
    )


def test_a_head_that_misses_a_transform_stops_before_step_one(tmp_path: Path):
    model_dir = write_remote_minicpm(tmp_path / "model")
    modeling = model_dir / "modeling_minicpm.py"
    code = modeling.read_text(encoding="utf-8")
    line = "logits = self.lm_head(hidden_states / (self.config.hidden_size / self.config.dim_model_base))"
    assert line in code
    modeling.write_text(code.replace(line, f"{line} * 3.0"), encoding="utf-8")

    proc = train_single(write_config_for(tmp_path, model_dir), cwd=tmp_path)
    assert_clean_failure(proc, "model.head", "MiniCPMForCausalLM", "model.head: exact")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )

    # the way out the message names: the model's own forward
    check(train_single(write_config_for(tmp_path, model_dir, head="exact"), cwd=tmp_path))
    assert (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir()
