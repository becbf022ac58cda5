from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_small_data


@pytest.fixture
def small_data(tmp_path: Path) -> dict[str, Path]:
    """64 train and 16 eval records of the bundled sft-rag set, copied into tmp_path."""
    return make_small_data(tmp_path)


@pytest.fixture(autouse=True, scope="session")
def index_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private index cache for the whole session (child processes inherit it through the environment)."""
    import os

    root = tmp_path_factory.mktemp("dstrain-cache")
    os.environ["DSTRAIN_CACHE_DIR"] = str(root)
    return root
