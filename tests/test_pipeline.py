"""End-to-end: the real `dvc repro` on a tiny copy of the project (64 px images, 16-unit LSTMs)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import copy_project, stages_run
from PIL import Image

from captioning.demo import draw_scene, plan_scenes
from captioning.scoring import METRIC_KEYS
from captioning.tiny_project import make_project, run, set_params, tool_env

STAGES = ("parse_pickle", "split", "extract_resnet_features", "train_lstm", "evaluate", "plot")
TIMING_KEYS = ("train_seconds", "decode_images_per_second")
pytestmark = pytest.mark.slow  # every test here runs or reads a whole `dvc repro`


def metrics_without_timing(project: Path) -> dict:
    values = {}
    for name in ("train", "eval"):
        data = json.loads((project / "metrics" / f"{name}.json").read_text())
        values[name] = {k: v for k, v in data.items() if k not in TIMING_KEYS}
        if "members" in data:  # an ensemble's: each member's training time too
            values[name]["members"] = [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in data["members"]]
    return values


def test_outputs_of_a_full_run(demo_run):
    train = json.loads((demo_run / "metrics/train.json").read_text())
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "train_seconds", "epochs"):
        assert train[key] is not None, key
    assert train["epochs"] == 2 and train["features_weights"] == "random"
    evaluation = json.loads((demo_run / "metrics/eval.json").read_text())
    assert set(METRIC_KEYS) <= evaluation.keys()
    assert set(METRIC_KEYS) <= evaluation["baseline_frequent"].keys()
    assert set(METRIC_KEYS) <= evaluation["baseline_nearest"].keys()
    if os.environ.get("CI") or shutil.which("java"):  # CI installs Java, so METEOR must be computed there
        assert isinstance(evaluation["meteor"], float) and 0 < evaluation["meteor"] < 1
    predictions = pd.read_parquet(demo_run / "data/predictions.parquet")
    assert len(predictions) == evaluation["test_images"] > 0
    assert {"image", "generated", "references", "bleu4", "cider"} <= set(predictions.columns)
    assert all(len(refs) == 5 for refs in predictions["references"])
    for name in ("samples", "learning_curves", "predictions", "best_worst"):
        with Image.open(demo_run / "plots" / f"{name}.png") as image:
            assert image.size[0] > 300
    history = pd.read_csv(demo_run / "dvclive/plots/metrics/val/loss.tsv", sep="\t")
    assert len(history) == 2


def test_second_repro_skips_every_stage(demo_run):
    result = run(["dvc", "repro"], demo_run)
    assert stages_run(result.stdout) == []
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout


def test_changing_epochs_reruns_only_training_and_after(demo_run, tmp_path):
    project = copy_project(demo_run, tmp_path / "p")
    set_params(project, {"train": {"epochs": 3}})
    splits_before = {path.name: path.read_bytes() for path in (project / "data/split").iterdir()}
    result = run(["dvc", "repro"], project)
    # split lists the whole params file (it stops on a misspelt section), and writes the same lists again
    assert stages_run(result.stdout) == ["split", "train_lstm", "evaluate", "plot"]
    assert {path.name: path.read_bytes() for path in (project / "data/split").iterdir()} == splits_before
    assert "resuming from the checkpoint after epoch 2" in result.stdout  # same params but epochs
    assert json.loads((project / "metrics/train.json").read_text())["epochs"] == 3
    diff = run(["dvc", "metrics", "diff", "--json"], project)
    assert "metrics/train.json" in json.loads(diff.stdout)


def test_ensemble_reuses_the_single_run_and_captions_like_evaluate(demo_run, tmp_path):
    """train.ensemble: 2 through the real stages. Member 1 is the single decoder of the same params, so it
    resumes the demo's finished run (here for one more epoch) and ends exactly as a clean ensemble run
    does; the caption command decodes the ensemble exactly as evaluate did."""
    clean = copy_project(demo_run, tmp_path / "clean")
    shutil.rmtree(clean / "checkpoints")
    set_params(clean, {"train": {"ensemble": 2, "epochs": 3}})
    assert "resuming" not in run(["dvc", "repro"], clean).stdout

    reused = copy_project(demo_run, tmp_path / "reused")
    set_params(reused, {"train": {"ensemble": 2, "epochs": 3}})
    result = run(["dvc", "repro"], reused)
    assert result.stdout.count("resuming from the checkpoint after epoch 2") == 1  # member 1 only
    assert "ensemble member 2 of 2 (seed 2)" in result.stdout
    assert metrics_without_timing(reused) == metrics_without_timing(clean)
    assert pd.read_parquet(reused / "data/predictions.parquet").equals(
        pd.read_parquet(clean / "data/predictions.parquet"))
    train = json.loads((reused / "metrics/train.json").read_text())
    single = json.loads((demo_run / "metrics/train.json").read_text())
    assert train["ensemble"] == 2 and train["parameters"] == 2 * single["parameters"]
    assert [member["epochs"] for member in train["members"]] == [3, 3]

    predictions = pd.read_parquet(reused / "data/predictions.parquet").head(3)
    images = [str(reused / "data/demo/images" / name) for name in predictions["image"]]
    printed = run([sys.executable, "-m", "captioning", "caption", *images], reused).stdout.splitlines()
    assert [line.split("\t")[1] for line in printed] == list(predictions["generated"])


def test_caption_command_gives_evaluates_caption(demo_run):
    predictions = pd.read_parquet(demo_run / "data/predictions.parquet").head(3)
    images = [str(demo_run / "data/demo/images" / name) for name in predictions["image"]]
    result = run([sys.executable, "-m", "captioning", "caption", *images], demo_run)
    printed = dict(line.split("\t") for line in result.stdout.splitlines())
    assert printed == dict(zip(images, predictions["generated"], strict=True))


def test_caption_command_on_new_and_bad_images(demo_run, tmp_path):
    scene = plan_scenes(5, seed=999)[4]
    new_image = tmp_path / "new scene.jpg"
    draw_scene(scene, 4, 64, seed=999).save(new_image, quality=92)
    (tmp_path / "notes.jpg").write_text("not an image")
    out = tmp_path / "captioned.png"
    result = run([sys.executable, "-m", "captioning", "caption", str(new_image), str(tmp_path / "missing.jpg"),
                  str(tmp_path / "notes.jpg"), "--beam", "3", "--out", str(out)], demo_run, check=False)
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{new_image}\t") and len(lines[0].split("\t")[1]) > 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "missing.jpg" in errors[0] and "notes.jpg" in errors[1]
    assert "Traceback" not in result.stderr
    # Three images asked for: the picture is numbered by its image's place among them, though the others failed.
    assert sorted(path.name for path in tmp_path.glob("captioned*")) == ["captioned-1.png"]
    with Image.open(tmp_path / "captioned-1.png") as image:
        assert image.format == "PNG"


def test_kill_during_training_then_repro_resumes_to_the_same_metrics(demo_run, tmp_path):
    epochs = 6
    straight = copy_project(demo_run, tmp_path / "straight")
    set_params(straight, {"train": {"epochs": epochs}})
    shutil.rmtree(straight / "checkpoints")
    run(["dvc", "repro"], straight)

    killed = copy_project(demo_run, tmp_path / "killed")
    set_params(killed, {"train": {"epochs": epochs}})
    shutil.rmtree(killed / "checkpoints")
    process = subprocess.Popen(["dvc", "repro"], cwd=killed, env=tool_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = killed / "checkpoints/state.json"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if state_file.exists() and json.loads(state_file.read_text())["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = json.loads(state_file.read_text())["epoch"]
    assert 2 <= done < epochs

    result = run(["dvc", "repro"], killed)
    assert f"resuming from the checkpoint after epoch {done}" in result.stdout
    assert metrics_without_timing(killed) == metrics_without_timing(straight)
    assert pd.read_parquet(killed / "data/predictions.parquet").equals(
        pd.read_parquet(straight / "data/predictions.parquet"))
    assert_same_model_files(killed, straight)  # or dvc.lock, `dvc status` and decode.json see another model


def assert_same_model_files(project: Path, other: Path) -> None:
    """Every file of the two projects' model bundles, byte for byte (model.keras held save times and ids)."""
    names = sorted(path.name for path in (other / "data/model").iterdir())
    assert sorted(path.name for path in (project / "data/model").iterdir()) == names
    for name in names:
        assert (project / "data/model" / name).read_bytes() == (other / "data/model" / name).read_bytes(), name


def test_two_clean_runs_are_identical(demo_run, tmp_path):
    again = make_project(tmp_path / "again")
    run(["dvc", "repro"], again)
    assert metrics_without_timing(again) == metrics_without_timing(demo_run)
    assert pd.read_parquet(again / "data/predictions.parquet").equals(
        pd.read_parquet(demo_run / "data/predictions.parquet"))
    for name in ("features/features.npy", "captions.parquet"):
        assert (again / "data" / name).read_bytes() == (demo_run / "data" / name).read_bytes()
    assert_same_model_files(again, demo_run)
