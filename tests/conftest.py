from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_small_data


@pytest.fixture
def small_data(tmp_path: Path) -> dict[str, Path]:
    """64 train and 16 eval records of the bundled sft-rag set, copied into tmp_path."""
    return make_small_data(tmp_path)
