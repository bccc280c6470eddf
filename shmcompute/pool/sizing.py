"""How many workers: ``pool_size`` and the ``SHMCOMPUTE_WORKERS`` environment variable."""

from __future__ import annotations

import os

from ..errors import ArgumentError, ArgumentTypeError

ENV_WORKERS = "SHMCOMPUTE_WORKERS"
_FACTORS = {"cpu": 1, "mixed": 2, "io": 4}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - macOS


def pool_size(kind: str = "cpu", reserve: int = 1) -> int:
    """A worker count for work of ``kind``, honouring ``SHMCOMPUTE_WORKERS``.

    ``"cpu"``: usable cores minus ``reserve`` (left for the caller), at least 1.
    ``"mixed"`` (compute with some blocking) is 2x that and ``"io"`` 4x. When the
    environment variable ``SHMCOMPUTE_WORKERS`` is set to a positive integer it wins.

    >>> pool_size("cpu")        # on 8 cores: 7
    """
    # Arguments are checked even when the environment variable decides the size: a bad
    # call must fail the same way on every machine, not only where the variable is unset.
    if kind not in _FACTORS:
        raise ArgumentError(
            f"kind must be one of {sorted(_FACTORS)}, got {kind!r} ('cpu' for compute, "
            "'mixed' for compute with some I/O, 'io' for mostly waiting)"
        )
    if isinstance(reserve, bool) or not isinstance(reserve, int):
        raise ArgumentTypeError(f"reserve must be an int, got {type(reserve).__name__}")
    if reserve < 0:
        raise ArgumentError(f"reserve must be >= 0, got {reserve}")
    env = os.environ.get(ENV_WORKERS)
    if env is not None and env.strip():
        return _parse_env(env)
    return max(1, usable_cores() - reserve) * _FACTORS[kind]


def _parse_env(value: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ArgumentError(
            f"environment variable {ENV_WORKERS}={value!r} is not an integer; set it to a "
            "worker count such as 4, or unset it to size the pool from the cores"
        ) from None
    if n < 1:
        raise ArgumentError(
            f"environment variable {ENV_WORKERS}={value!r} must be >= 1; set a worker "
            "count such as 4, or unset it"
        )
    return n


def resolve_max_workers(max_workers: int | None) -> int:
    """The constructor's ``max_workers``: validated, or the default size."""
    if max_workers is None:
        return pool_size("cpu")
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise ArgumentTypeError(
            f"max_workers must be an int or None, got {type(max_workers).__name__}"
        )
    if max_workers < 1:
        raise ArgumentError(f"max_workers must be >= 1, got {max_workers}")
    return max_workers
