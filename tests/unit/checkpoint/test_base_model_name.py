"""The base model an adapter names: written absolute (a Hub id as given), and `dstrain inspect` says whether
it is here and how to load it when it is not (a relative path of an older checkpoint, a Hub id; dstrain's
builtin: tests/integration/test_export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dstrain.checkpoint.report import base_info, inspect_checkpoint
from dstrain.model.build import base_reference
from tests.unit.checkpoint.test_formats import v2_checkpoint


def test_a_local_dir_is_named_absolute_and_a_hub_id_as_given(tmp_path, monkeypatch):
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_reference("my-model") == str(tmp_path / "my-model")
    assert base_reference("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


def naming(tmp_path: Path, name: str, model_path: str) -> Path:
    ckpt = v2_checkpoint(tmp_path / "run", 2)
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": name}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": {"path": model_path}}), encoding="utf-8")
    return ckpt


def test_a_local_base_that_is_here_needs_no_note(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert base_info(naming(tmp_path, str(model), "my-model")) == {
        "name_or_path": str(model),
        "found": True,
        "note": None,
    }


@pytest.mark.parametrize(
    ("name", "says"),
    [("model", "a relative path"), ("org/some-model", "looks it up on the Hub"), ("/gone/model", "moved")],
)
def test_a_base_that_is_not_here_is_said_with_how_to_load_it(tmp_path, capsys, name, says):
    ckpt = naming(tmp_path, name, name)
    inspect_checkpoint(ckpt)  # the manifest no longer matches the edited files: only the base lines matter
    out = capsys.readouterr().out
    assert f"{name} (not found here)" in out and says in out and "from_pretrained(BASE_DIR), CKPT)" in out
