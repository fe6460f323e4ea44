"""The walkthrough notebook runs top to bottom on the outputs of a real (tiny) `dvc repro`."""
from __future__ import annotations

import shutil

import nbformat
import pytest
from helpers import copy_project
from nbclient import NotebookClient

from captioning.tiny_project import PROJECT

NOTEBOOK = PROJECT / "notebooks" / "captioning.ipynb"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(demo_run, tmp_path):
    project = tmp_path / "project"
    copy_project(demo_run, project)  # the shared run stays untouched
    (project / "notebooks").mkdir()
    shutil.copy2(NOTEBOOK, project / "notebooks")
    notebook = nbformat.read(project / "notebooks" / NOTEBOOK.name, as_version=4)
    # Started in notebooks/, as Jupyter would: the notebook itself must find the project root.
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(project / "notebooks")}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert f"project: {project}" in printed
    assert "residual_5 -> dropout -> logits" in printed
