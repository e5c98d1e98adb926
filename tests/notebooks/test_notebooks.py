"""Every notebook runs top to bottom and writes at least one figure under figures/."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "figures").glob("*.png")}
    env_interp = os.environ.get("TRITON_INTERPRET")
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    after = {p: p.stat().st_mtime_ns for p in (ROOT / "figures").glob("*.png")}
    written = [p for p, t in after.items() if before.get(p) != t]
    assert written, f"{path.name} wrote no figure under figures/"
    assert env_interp == os.environ.get("TRITON_INTERPRET")
