"""Set-up for the tests (the guards against leaks and hangs are in the root conftest.py,
shared with benchmarks/)."""

from __future__ import annotations

import multiprocessing as mp

import pytest


@pytest.fixture(scope="session", autouse=True)
def _compiled_once():
    """Compile every kernel in this process before a child can race to cache it."""
    from shmcompute.pool import _spin
    from tests import _helpers

    _helpers.warm_up()
    _spin.warm_up()
    mp.set_forkserver_preload(
        [
            "numpy",
            "numba",
            "shmcompute.atomics",
            "shmcompute.pool.worker",
            "tests._helpers",
            "tests._pool_tasks",
        ]
    )
