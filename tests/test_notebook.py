"""notebooks/walkthrough.ipynb: committed without outputs, and every cell runs (nbclient) on the
outputs of a tiny default `kedro run`; the notebook finds that project through
RARE_CXR_PROJECT and draws its figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code[0].source.strip() == "%load_ext kedro.ipython"
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_on_a_tiny_default_run(tiny_default_run, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RARE_CXR_PROJECT", str(tiny_default_run.path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # run from a folder outside any project: only RARE_CXR_PROJECT can lead it to the run
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # prevalence, cache images, augmentation preview, score histograms, Grad-CAM panel
    assert len(images) >= 5, [o.get("data", {}).keys() for o in outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "multiscale_resnet:" in text and "test images" in text
