"""The walkthrough notebook runs top to bottom on the outputs of a real (tiny) `dvc repro`."""
from __future__ import annotations

import shutil

import nbformat
import pandas as pd
import pytest
from helpers import copy_project
from nbclient import NotebookClient

from captioning import files, layout
from captioning.tiny_project import PROJECT, run, set_params

NOTEBOOK = PROJECT / "notebooks" / "captioning.ipynb"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def execute_notebook(project):
    """Run the notebook from the project's notebooks/ folder; return it with its outputs."""
    (project / "notebooks").mkdir()
    shutil.copy2(NOTEBOOK, project / "notebooks")
    notebook = nbformat.read(project / "notebooks" / NOTEBOOK.name, as_version=4)
    # Started in notebooks/, as Jupyter would: the notebook itself must find the project root.
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(project / "notebooks")}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    return notebook


def printed_text(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(demo_run, tmp_path):
    project = tmp_path / "project"
    copy_project(demo_run, project)  # the shared run stays untouched
    printed = printed_text(execute_notebook(project))
    assert f"project: {project}" in printed
    assert "residual_5 -> dropout -> logits" in printed


@pytest.mark.slow
def test_notebook_runs_on_an_ensemble(demo_run, tmp_path):
    """With train.ensemble > 1 (the README's real-photos settings use 3), metrics/train.json has the
    epochs per member only: the training-time cell stopped with KeyError 'epochs', and the LSTM table,
    read from the ensemble's own layers rather than a member's, came out empty."""
    project = tmp_path / "project"
    copy_project(demo_run, project)
    set_params(project, {"train": {"ensemble": 2}})
    run(["dvc", "repro"], project)  # train_lstm, evaluate, plot
    notebook = execute_notebook(project)
    printed = printed_text(notebook)
    members = files.read_json(project / layout.TRAIN_METRICS)["members"]
    epochs = sum(member["epochs"] for member in members)
    assert len(members) == 2 and f" s for {epochs} epochs of 2 decoder(s)" in printed, printed
    (table,) = [cell for cell in notebook.cells if cell.cell_type == "code" and "lstms = " in cell.source]
    shown = "".join(output.get("data", {}).get("text/plain", "") for output in table.outputs)
    rows = [line for line in shown.splitlines()[1:] if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 5, f"the LSTM table should list the five stacked LSTMs:\n{shown}"


@pytest.mark.slow
def test_notebook_best_and_worst_table_shows_each_image_once(demo_run, tmp_path):
    """On a test split under 6 images, head(3) and tail(3) overlapped: the table listed images as both
    best and worst. The notebook now ranks them with the package's best_and_worst, as the plot does."""
    project = tmp_path / "project"
    copy_project(demo_run, project)
    set_params(project, {"split": {"train_fraction": 0.85, "dev_fraction": 0.1}})
    run(["dvc", "repro"], project)
    test_images = pd.read_parquet(project / layout.PREDICTIONS)["image"].tolist()
    assert 1 < len(test_images) < 6, f"the split should leave fewer than 6 test images: {test_images}"
    notebook = execute_notebook(project)
    (table,) = [cell for cell in notebook.cells if cell.cell_type == "code" and "baseline_nearest" in cell.source
                and "generated" in cell.source]
    shown = "".join(output.get("data", {}).get("text/plain", "") for output in table.outputs)
    counts = {name: shown.count(name) for name in test_images}
    assert all(count <= 1 for count in counts.values()) and sum(counts.values()) == len(test_images), (
        f"each test image once in the best/worst table: {counts}\n{shown}")
