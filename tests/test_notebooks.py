"""Every notebook executes top to bottom (on a copy; the committed outputs are untouched)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  if path.stem.startswith("01"):
    assert images and "forward only" in texts
  if path.stem.startswith("02"):
    assert "bit-identical gradients: True" in texts and "RecomputationMismatchError" in texts
  if path.stem.startswith("03"):
    assert "exact gradients: True" in texts and "fits: False" not in texts
    assert "placed in pinned_host" in texts
