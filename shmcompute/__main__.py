"""The ``shmcompute`` command: ``bench``, ``demo``, ``info`` and ``reap``."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _info() -> int:
    import numba
    import numpy

    import shmcompute
    from shmcompute.array import PREFIX, SHM_DIR, _fmt_bytes, _shm_free_bytes

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    free = _shm_free_bytes()
    ours = (
        [n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)] if os.path.isdir(SHM_DIR) else []
    )
    rows = [
        ("shmcompute", shmcompute.__version__),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("numpy", numpy.__version__),
        ("numba", numba.__version__),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("cores usable", f"{cores} (of {os.cpu_count()})"),
        ("numba threading layer", str(getattr(numba.config, "THREADING_LAYER", "?"))),
        (f"free in {SHM_DIR}", _fmt_bytes(free) if free is not None else "unknown"),
        ("shmcompute segments", str(len(ours))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _reap(dry_run: bool) -> int:
    from shmcompute import reap

    names = reap(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {len(names)} segment(s) of dead processes")
    for n in names:
        print(f"  {n}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own options: shmcompute bench --help
        from shmcompute import bench

        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="shmcompute", description="Parallel array compute on shared memory."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="shmcompute against NumPy, Numba, the stdlib pools, joblib")
    demo = sub.add_parser("demo", help="a short real run of the core, checked against NumPy")
    demo.add_argument("--size", type=int, default=16_000_000, help="elements (default 16M)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument("--rounds", type=int, default=2000, help="round trips to time")
    sub.add_parser("info", help="versions, cores, Numba threading layer, free /dev/shm")
    reap = sub.add_parser("reap", help="remove segments whose owning process is gone")
    reap.add_argument("--dry-run", action="store_true", help="only list them")
    args = parser.parse_args(argv)

    if args.command == "demo":
        for name in ("size", "workers", "rounds"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        from shmcompute import _demo

        return _demo.run(args.size, args.workers, args.rounds)
    if args.command == "info":
        return _info()
    return _reap(args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
