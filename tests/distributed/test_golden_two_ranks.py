"""The golden run dirs written on 2 ranks resume on 2 ranks (deepspeed launcher, gloo on CPU): the resumed
steps reproduce their recorded losses within fp32 rounding, and a fork of the resumed run at step 3 resumes
again to the same losses and state bitwise (tests/integration/test_golden.py covers 1 rank, inspect and
export; tests/numerics.py says why a record from another machine is not compared bitwise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_golden import golden_dirs, resume_and_fork

pytestmark = [pytest.mark.distributed, pytest.mark.numerics]


@pytest.mark.parametrize("src", golden_dirs(2), ids=lambda p: p.parent.name)
def test_golden_two_rank_resume_reproduces_recorded_losses(src: Path, tmp_path: Path):
    assert "world 2" in resume_and_fork(src, tmp_path, "--num-gpus", "2")
