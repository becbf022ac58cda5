from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_small_data


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files that hold a `slow` test first, each file's tests in their order: xdist (`--dist loadfile`) hands
    out files in collection order, so the minutes-long learning checks start at once instead of ending the
    one-process part alone on one worker while the other idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: everything else keeps its order


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
