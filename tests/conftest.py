"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads slow
    every test: modules using this run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- a real one-node Slurm for the Slurm tests (tests/slurm_cluster.py) ---------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on a private local Slurm cluster (skips without Slurm)")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private one-node cluster on localhost, started once per test session and stopped afterwards.

    Skips, saying how to enable it, where Slurm is not installed or we are not root; with
    TAYLORSEER_REQUIRE_SLURM=1 (set by .ci/run) that is a failure instead. A cluster that does not come
    up within its timeout fails with its daemons' logs.
    """
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from slurm_cluster import REQUIRE_ENV, SlurmCluster, why_unavailable

    reason = why_unavailable()
    if reason:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but the Slurm tests cannot run: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster().start(timeout=90)
    print(f"\n[slurm] local cluster up: {cluster.describe()}")
    yield cluster
    cluster.stop(timeout=60, remove=True)
    print(f"\n[slurm] local cluster stopped: {cluster.describe()}")
