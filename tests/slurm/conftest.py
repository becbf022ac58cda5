from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmUnavailableError, required

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here is `slurm`, `distributed` (multi-task job steps) and `solo` (one cluster, requeues on
    Slurm's clock); the markers live in pyproject."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.distributed)
            item.add_marker(pytest.mark.solo)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A running cluster: ``env`` (SLURM_CONF, PATH), ``run``, ``sbatch``, ``job``, ``wait_job``, ``state_dir``.

    Skips with one reason (a daemon's log tail included) when the cluster cannot start; fails instead under
    DSTRAIN_REQUIRE_SLURM=1, so CI cannot hide a broken setup behind a skip. The cluster's directory
    (slurm.conf, logs) is removed at the end unless DSTRAIN_SLURM_KEEP=1.
    """
    cluster = SlurmCluster(keep=os.environ.get("DSTRAIN_SLURM_KEEP") == "1")
    try:
        cluster.start()
        reason = ""
    except SlurmUnavailableError as err:
        reason = str(err)
    if reason and required():
        pytest.fail(f"{reason} (DSTRAIN_REQUIRE_SLURM=1)", pytrace=False)
    if reason:
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        cluster.stop()
