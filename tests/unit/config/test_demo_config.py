"""configs/demo.yaml is the embedded demo written out: the two must not drift apart."""

from __future__ import annotations

from pathlib import Path

from dstrain.config.demo import demo_config
from dstrain.config.run import RunConfig, load_config
from tests.helpers import REPO


def resolved(cfg: RunConfig, root: Path) -> RunConfig:
    cfg.data.train = [str((root / p).resolve()) for p in cfg.data.train]
    cfg.data.eval = [str((root / p).resolve()) for p in cfg.data.eval]
    cfg.ds_config = str((root / cfg.ds_config).resolve())
    return cfg


def test_demo_yaml_equals_the_embedded_demo():
    from_file = resolved(load_config(REPO / "configs" / "demo.yaml"), REPO)
    embedded = resolved(load_config(None, base=demo_config()), Path("/"))
    assert from_file == embedded
