"""The notebooks in notebooks/ run top to bottom, at a small size, without errors.

Each one runs in a temporary copy of notebooks/ (the stored full-size outputs are never
touched) in a fresh Jupyter kernel of this interpreter, which nbclient shuts down when
the run ends; the notebooks shut their own pools down and unlink their segments, which
the autouse leak checker in conftest.py verifies.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
SMALL = "0.01"  # SHMCOMPUTE_NB_SCALE: all three notebooks in well under a minute
CELL_TIMEOUT = 120  # seconds per cell; a small run needs a few
CLEAN = "segments left behind: 0; worker processes left: 0"


def _outputs(nb: object) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_notebooks_exist() -> None:
    """Guards the glob: a renamed folder must not turn the runs below into no tests."""
    assert {"01_modes.ipynb", "02_scaling.ipynb", "03_worked_example.ipynb"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_has_outputs(name: str) -> None:
    """The committed notebook carries the outputs of a full run: plots, no errors."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no stored plot"
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code"), (
        "stored notebook was not run top to bottom"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "notebooks"
    shutil.copytree(
        NOTEBOOKS, folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
    )
    nb = nbformat.read(folder / name, as_version=4)
    monkeypatch.setenv("SHMCOMPUTE_NB_SCALE", SMALL)  # the kernel inherits the environment
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},  # cwd: helper modules import
    )
    # Our own event loop, closed afterwards; the kernel is shut down before this returns.
    asyncio.run(client.async_execute())
    nbformat.write(nb, folder / name)  # executed copy, for a look when this fails

    outputs = _outputs(nb)
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no plot"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert CLEAN in text, f"{name} did not finish with its clean-up check"
