"""The README's quick-start code runs as written (in a fresh interpreter)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


def _blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_its_examples() -> None:
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_python_block_runs(tmp_path: pathlib.Path, i: int) -> None:
    code = _blocks()[i]
    script = tmp_path / f"readme_block_{i}.py"  # a file: Numba caches need one
    script.write_text(code)
    proc = subprocess.run(  # (within the test's 120 s limit: a clear error, not a dump)
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=ROOT
    )
    assert proc.returncode == 0, (code, proc.stderr[-3000:])
    assert "resource_tracker" not in proc.stderr and "leaked" not in proc.stderr
