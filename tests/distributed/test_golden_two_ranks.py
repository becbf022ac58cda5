"""The golden run dirs written on 2 ranks resume on 2 ranks (deepspeed launcher, gloo on CPU) and reproduce
their recorded losses bitwise (tests/integration/test_golden.py covers 1 rank, inspect and export)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import check, dstrain
from tests.integration.test_golden import golden_dirs, materialise, recorded_losses, resumed_losses

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("src", golden_dirs(2), ids=lambda p: p.parent.name)
def test_golden_two_rank_resume_reproduces_recorded_losses(src: Path, tmp_path: Path):
    work = materialise(src, tmp_path)
    proc = check(dstrain("resume", "run", "--num-gpus", "2", cwd=work))
    assert "world 2" in proc.stdout and "at step 2" in proc.stdout
    assert resumed_losses(work / "run") == recorded_losses(src)
