"""The guards of the root conftest.py, run on probe tests in a child pytest: a test
stuck where pytest-timeout's signal cannot reach it ends the run with every stack, and
a leaked segment fails the test that leaked it and is removed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STUCK_IN_COMPILED_CODE = textwrap.dedent(
    """
    import numpy as np
    import pytest

    from tests import _helpers as H

    H.kernel_wait_forever(np.zeros(8, np.int64), 0, 1)  # compiled here (returns: 0 != 1)

    @pytest.mark.timeout(1)
    def test_waits_forever_in_a_kernel():
        H.kernel_wait_forever(np.zeros(8, np.int64), 0, 0)  # nothing will notify

    def test_never_reached():
        pass
    """
)

LEAKS_A_SEGMENT = textwrap.dedent(
    """
    import os

    import shmcompute as shc
    from shmcompute.array import SHM_DIR

    KEEP = []

    def test_leaks():
        KEEP.append(shc.zeros(16))  # never closed nor unlinked

    def test_next_finds_it_removed():
        assert not os.path.exists(os.path.join(SHM_DIR, KEEP[0].name))
    """
)


def _pytest(tmp_path: Path, source: str, **env: str) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / "test_probe.py"
    probe.write_text(source)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "conftest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ROOT / "pyproject.toml"),
            str(probe),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, **env},
    )


def test_a_test_stuck_in_compiled_code_ends_the_run_with_every_stack(tmp_path):
    proc = _pytest(tmp_path, STUCK_IN_COMPILED_CODE, SHMCOMPUTE_TEST_HANG_GRACE_S="1")
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Timeout" in proc.stderr, proc.stderr
    assert "test_waits_forever_in_a_kernel" in proc.stderr, proc.stderr
    assert "passed" not in proc.stdout, proc.stdout  # the run ended there


def test_a_leaked_segment_fails_its_test_and_is_removed(tmp_path):
    proc = _pytest(tmp_path, LEAKS_A_SEGMENT)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "test leaked shared-memory segments" in proc.stdout, proc.stdout
    assert "2 passed, 1 error" in proc.stdout, proc.stdout  # (the error: the leak)
