"""DVC experiments on the tiny project: the README's "Compare experiments" commands, as written.

Two queued runs (1 and 3 epochs) rerun split, train_lstm, evaluate and plot in temporary folders; then
`dvc exp show`, `dvc metrics diff` and `dvc plots diff` compare them. This needs the metrics and the
DVCLive curves in git (`cache: false` outputs that .gitignore must not hide) and the PNG plots in
DVC's cache: otherwise every experiment shows `!` for its metrics and nothing to plot.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import copy_project, stages_run

from captioning.tiny_project import make_project, run

EXPERIMENTS = {"epochs-1": 1, "epochs-3": 3}
SHOW_COLUMNS = "Experiment|train.epochs|val_loss|bleu4|cider"  # the README's `dvc exp show` view


def readme_rerun_sentence() -> str:
    """The README's sentence on which stages a queued variant reruns."""
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    return text.split("only the stages the change affects rerun", 1)[1].split(":", 1)[0]


def experiments_by_name(show: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` -> {experiment name: its data (params, metrics, ...)}."""
    found = {}
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            found[experiment["name"]] = experiment["revs"][0]["data"]
    return found


@pytest.mark.slow
def test_queued_experiments_are_compared(demo_run, tmp_path):
    project = copy_project(demo_run, tmp_path / "project")  # the shared run stays untouched
    # Experiments start from a commit: commit the finished `dvc repro` (dvc.lock, metrics, curves).
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)
    tracked = run(["git", "ls-files", "metrics", "dvclive"], project).stdout.split()
    assert {"metrics/train.json", "metrics/eval.json", "dvclive/plots/metrics/val/loss.tsv"} <= set(tracked)
    try:
        for name, epochs in EXPERIMENTS.items():
            run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.epochs={epochs}", "-C", "data/demo"],
                project)
        run(["dvc", "exp", "run", "--run-all"], project, timeout=900)  # starts a worker, follows the logs, waits
        status = run(["dvc", "queue", "status"], project).stdout
        for name in EXPERIMENTS:
            line = next(line for line in status.splitlines() if f" {name} " in f" {line} ")
            assert "Success" in line, f"{name} did not succeed:\n{run(['dvc', 'queue', 'logs', name], project).stdout}"
        logs = run(["dvc", "queue", "logs", "epochs-1"], project).stdout
        assert "Stage 'extract_resnet_features' didn't change, skipping" in logs
        rerun = stages_run(logs)  # split reruns on any change of params.yaml; the README's sentence left it out
        assert rerun == ["split", "train_lstm", "evaluate", "plot"], rerun
        assert all(f"`{stage}`" in readme_rerun_sentence() for stage in rerun), f"the README names not all of {rerun}"
        assert " decoding: " in logs and "scoring the model: " in logs  # evaluate's progress bars

        table = run(["dvc", "exp", "show", "--drop", ".*", "--keep", SHOW_COLUMNS, "--csv"], project).stdout
        assert set(table.splitlines()[0].split(",")) == {"Experiment", "val_loss", "bleu4", "cider", "train.epochs"}
        shown = experiments_by_name(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout))
        assert set(EXPERIMENTS) <= set(shown)
        for name, epochs in EXPERIMENTS.items():
            metrics = shown[name]["metrics"]
            assert shown[name]["params"]["params.yaml"]["data"]["train"]["epochs"] == epochs
            assert metrics["metrics/train.json"]["data"]["epochs"] == epochs
            assert isinstance(metrics["metrics/eval.json"]["data"]["bleu4"], float)

        params = json.loads(run(["dvc", "params", "diff", "epochs-1", "epochs-3", "--json"], project).stdout)
        assert list(params["params.yaml"]) == ["train.epochs"]  # the one param the two runs differ in
        assert (params["params.yaml"]["train.epochs"]["old"], params["params.yaml"]["train.epochs"]["new"]) == (1, 3)
        diff = json.loads(run(["dvc", "metrics", "diff", "epochs-1", "epochs-3", "--json"], project).stdout)
        assert diff["metrics/train.json"]["epochs"] == {"old": 1, "new": 3, "diff": 2}
        assert "bleu4" in diff["metrics/eval.json"]
        run(["dvc", "metrics", "diff", "epochs-1", "epochs-3"], project)

        plots = run(["dvc", "plots", "diff", "epochs-1", "epochs-3"], project)
        assert "failed to load" not in plots.stdout + plots.stderr
        page = (project / "dvc_plots" / "index.html").read_text()
        assert "Loss (masked cross-entropy)" in page
        images = {path.name for path in (project / "dvc_plots" / "static").glob("*.png")}
        assert {"epochs-1_plots_learning_curves.png", "epochs-3_plots_learning_curves.png"} <= images
    finally:
        run(["dvc", "queue", "stop", "--kill"], project, check=False, timeout=120)


def test_an_experiment_on_the_demo_params_parses_the_demo_they_describe(tmp_path):
    """The demo data is made by `python -m captioning demo`, no stage, and no stage listed the demo params:
    `dvc exp run -S demo.n_images=40` ran nothing and the experiment measured the old 60 images under the
    new params. Now parse_pickle lists them and makes the demo again; DVC records the new data, so a
    second `dvc repro` has nothing to do. Parsing and splitting only: no TensorFlow."""
    project = make_project(tmp_path / "project")  # 60 demo images
    run(["dvc", "repro", "split"], project)
    result = run(["dvc", "exp", "run", "-S", "demo.n_images=40", "split"], project)
    assert stages_run(result.stdout) == ["parse_pickle", "split"], result.stdout
    assert "demo written: 40 images" in result.stdout
    assert len(list((project / "data/demo/images").iterdir())) == 40
    assert len((project / "data/images.txt").read_text().split()) == 40
    split = [(project / f"data/split/{name}.txt").read_text().split() for name in ("train", "dev", "test")]
    assert sum(map(len, split)) == 40
    again = run(["dvc", "repro", "split"], project)
    assert stages_run(again.stdout) == [], again.stdout
