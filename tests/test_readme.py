"""The README's quick-start code runs as written (in a fresh interpreter)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(__file__))


def _blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_python_block_runs(tmp_path: pathlib.Path) -> None:
    blocks = _blocks()
    assert len(blocks) >= 3
    for i, code in enumerate(blocks):
        script = tmp_path / f"readme_block_{i}.py"  # a file: Numba caches need one
        script.write_text(code)
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=ROOT
        )
        assert proc.returncode == 0, (code, proc.stderr[-3000:])
        assert "resource_tracker" not in proc.stderr and "leaked" not in proc.stderr
