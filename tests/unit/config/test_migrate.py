"""Run-config schema versions: `version` is optional and written back, an old config's renamed keys are
migrated and reported one line each, a newer schema is one error naming both, unknown keys stay errors."""

from __future__ import annotations

import pytest
import yaml

from dstrain.config import migrate
from dstrain.config.migrate import CONFIG_VERSION, Rename
from dstrain.config.run import config_from_dict, dump_yaml
from dstrain.errors import ConfigError

BASE = {"data": {"train": ["train.jsonl"]}}
# A hypothetical schema 2: train.steps became train.max_steps; lora.rank became lora.r and counts double.
TABLE = {
    1: [
        Rename("train.steps", "train.max_steps"),
        Rename("lora.rank", "lora.r", convert=lambda v: 2 * v, why="now counts both factors"),
    ]
}


def test_production_table_is_empty_and_version_is_optional():
    assert migrate.MIGRATIONS == {} and CONFIG_VERSION == 1
    cfg = config_from_dict(dict(BASE))
    assert cfg.version == CONFIG_VERSION
    assert yaml.safe_load(dump_yaml(cfg))["version"] == CONFIG_VERSION  # written into the run dir


def test_an_old_key_is_migrated_and_reported():
    raw = {"train": {"steps": 7}, "lora": {"rank": 4}, "data": {"train": ["x"]}}
    out, notes = migrate.migrate(raw, TABLE, current=2)
    assert out["train"] == {"max_steps": 7} and out["lora"] == {"r": 8} and out["version"] == 2
    assert notes == [
        "train.steps (config version 1) is now train.max_steps",
        "lora.rank (config version 1) is now lora.r = 8 (now counts both factors)",
    ]
    assert raw["train"] == {"steps": 7}  # the caller's dict is left alone


def test_a_current_config_is_not_migrated():
    out, notes = migrate.migrate({"version": 2, "train": {"max_steps": 3}}, TABLE, current=2)
    assert notes == [] and out["train"] == {"max_steps": 3}


def test_an_explicit_new_key_wins_over_the_old_one():
    out, notes = migrate.migrate({"train": {"steps": 7, "max_steps": 9}}, TABLE, current=2)
    assert out["train"] == {"max_steps": 9}
    assert notes == ["train.steps (config version 1) dropped: train.max_steps is set"]


def test_the_migration_runs_in_config_loading(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(migrate, "MIGRATIONS", TABLE)
    monkeypatch.setattr(migrate, "CONFIG_VERSION", 2)
    monkeypatch.delenv("RANK", raising=False)
    cfg = config_from_dict({**BASE, "version": 1, "train": {"steps": 11}}, source="old.yaml")
    assert cfg.train.max_steps == 11 and cfg.version == 2
    assert (
        capsys.readouterr().err == "old.yaml: config: train.steps (config version 1) is now train.max_steps\n"
    )


def test_a_newer_schema_is_one_error_naming_both():
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, "version": CONFIG_VERSION + 1}, source="new.yaml")
    assert len(err.value.problems) == 1
    message = err.value.problems[0]
    assert f"version: {CONFIG_VERSION + 1} is a newer config schema" in message
    assert f"up to version {CONFIG_VERSION}" in message and "upgrade dstrain" in message


@pytest.mark.parametrize("bad", [0, "one", True, -3])
def test_a_bad_version_is_an_error(bad: object):
    with pytest.raises(ConfigError, match="version: expected a config schema version"):
        config_from_dict({**BASE, "version": bad})


def test_unknown_keys_stay_errors(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(migrate, "MIGRATIONS", TABLE)
    monkeypatch.setattr(migrate, "CONFIG_VERSION", 2)
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
        config_from_dict({**BASE, "version": 1, "train": {"stepz": 3}})
