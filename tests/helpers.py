"""Helpers the tests share (fixtures stay in conftest.py; the tiny project is captioning.tiny_project)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from captioning import files
from captioning.tiny_project import PROJECT, tool_env

CONSOLE_SCRIPT = Path(sys.executable).parent / "captioning"  # the venv's, from pyproject.toml's [project.scripts]


def stages_env(**extra: str) -> dict:
    """tool_env() where `python -m stages.x` works from any folder: the stages are entry points in the
    project root, not part of the installed package."""
    env = tool_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def write_feature_folder(folder: Path, images: list[str], matrix: np.ndarray) -> None:
    """A feature folder as extraction writes it: row i of `matrix` is the feature of images[i]."""
    folder.mkdir()
    np.save(folder / "features.npy", matrix)
    pd.DataFrame({"image": images, "row": range(len(images))}).to_parquet(folder / "index.parquet")
    files.write_json(folder / "backbone.json", {"weights": "random", "seed": 0, "image_size": 32,
                                                "precision": "float32"})


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order, from its output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def copy_project(source: Path, dest: Path) -> Path:
    """A copy of a finished project (DVC's cache links kept as links), so the source stays untouched."""
    shutil.copytree(source, dest, symlinks=True)
    return dest


# The decoder tests' baseline: beam search's most probable beam, no n-gram blocking. Captioner.caption_ids
# has no defaults (params.yaml's `decode` section is their one source), so each test says what it decodes with.
PLAIN_DECODE = {"method": "beam", "beam_size": 3, "max_length": 20, "length_penalty": 0.0, "batch_size": 256,
                "rerank": "none", "no_repeat_ngram": 0}


def plain_decode(**settings) -> dict:
    """Captioner.caption_ids' keyword arguments: PLAIN_DECODE with `settings` laid over it."""
    return {**PLAIN_DECODE, **settings}


TOY_CAPTIONS = ["a red circle", "two blue squares", "three green triangles", "a red square"]


def fit_toy_decoder(seed: int, epochs: int):
    """A tiny decoder trained with `seed` on TOY_CAPTIONS, whose caption is readable from the features'
    first column; returns (decoder, vocabulary, one feature row per caption)."""
    import numpy as np

    from captioning.model import build_decoder, compile_decoder, make_optimizer
    from captioning.tf_setup import seed_everything
    from captioning.vocab import Vocabulary

    seed_everything(seed)
    vocab = Vocabulary.build(TOY_CAPTIONS, 1)
    sequences, _ = vocab.encode_all(TOY_CAPTIONS * 8, 10)
    features = np.random.default_rng(0).normal(size=(len(sequences), 32)).astype("float32")
    features[:, 0] = np.tile(np.arange(4), 8)
    decoder = build_decoder(len(vocab), 16, 1e-6, 0.2, features.mean(0), features.var(0))
    compile_decoder(decoder, make_optimizer("adam", 1e-2, 1.0))
    decoder.fit({"features": features, "tokens": sequences[:, :-1]}, sequences[:, 1:], epochs=epochs, batch_size=8,
                verbose=0)
    return decoder, vocab, features[:len(TOY_CAPTIONS)]


def saved_weight_paths(model_file: Path) -> list[str]:
    """The paths of every array stored in a .keras file (its model.weights.h5), e.g. layers/lstm_1/..."""
    import zipfile

    import h5py

    paths = []
    with zipfile.ZipFile(model_file) as archive, archive.open("model.weights.h5") as weights, \
            h5py.File(weights, "r") as h5:
        h5.visititems(lambda name, item: paths.append(name) if isinstance(item, h5py.Dataset) else None)
    return paths


def user_error_in_child(setup: str, call: str, *args: str, memory_gb: int | None = None) -> str:
    """Run `setup` then `call` (one line of Python reading `sys.argv[1:]`, i.e. `args`) in a child process
    and return the message of the UserError it raises ("" if none). Why a child: a regression may kill
    the interpreter (a segmentation fault) or take the machine's memory; with `memory_gb` the child's
    address space is limited to that, so a regression ends in a MemoryError. Fails on any other ending."""
    limit = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({memory_gb} << 30, {memory_gb} << 30))\n"
    code = ((limit if memory_gb else "") + "import sys\nfrom captioning.errors import UserError\n" + setup + "\n"
            f"try:\n    {call}\nexcept UserError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


WORDS = ["a", "red", "blue", "green", "circle", "square", "two", "big", "small", "on", "grass"]
# The project's train params (so every knob is there, e.g. scst_epochs: 0), at tiny sizes.
TINY_TRAIN = {**yaml.safe_load((PROJECT / "params.yaml").read_text())["train"],
              "seed": 1, "epochs": 2, "batch_size": 16, "units": 16, "l1": 1e-6, "dropout": 0.3, "ensemble": 1,
              "optimizer": "adam", "learning_rate": 0.001, "clipnorm": 1.0, "min_count": 1, "max_length": 10,
              "strategy": "default", "restore_best_weights": True, "patience": 0}


def write_inputs(project: Path, strategy: str, n_images: int = 40) -> None:
    """What train_lstm reads, synthetic: captions table, split, features folder, params.yaml."""
    rng = np.random.default_rng(0)
    images = [f"img{i:03d}.jpg" for i in range(n_images)]
    captions = pd.DataFrame([(image, " ".join(rng.choice(WORDS, size=rng.integers(3, 8))))
                             for image in images for _ in range(3)], columns=["image", "caption"])
    features = project / "data/features"
    features.mkdir(parents=True)
    np.save(features / "features.npy", rng.normal(size=(n_images, 2048)).astype(np.float32))
    files.write_parquet(features / "index.parquet", pd.DataFrame({"image": images, "row": np.arange(n_images)}))
    files.write_json(features / "backbone.json", {"weights": "random", "seed": 0, "image_size": 32,
                                                  "precision": "float32", "weights_sha256": None})
    files.write_parquet(project / "data/captions.parquet", captions)
    files.write_lines(project / "data/split/train.txt", images[: n_images * 3 // 4])
    files.write_lines(project / "data/split/dev.txt", images[n_images * 3 // 4:])
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "strategy": strategy}}))


def run_in_process(project: Path, strategy: str, **knobs) -> tuple[dict, list[np.ndarray]]:
    """One epoch (unless `knobs` say otherwise) through captioning.train.train in this process; its metrics
    and final weights."""
    from captioning.train import TrainConfig, TrainPaths, keras, train

    write_inputs(project, strategy)
    data = project / "data"
    metrics = train(TrainConfig(**{**TINY_TRAIN, "epochs": 1, "dropout": 0.0, "strategy": strategy, **knobs}),
                    pd.read_parquet(data / "captions.parquet"), (data / "split/train.txt").read_text().split(),
                    (data / "split/dev.txt").read_text().split(),
                    TrainPaths(data / "features", data / "model", project / "checkpoints", project / "dvclive",
                               (data / "captions.parquet",)))
    return metrics, keras.models.load_model(data / "model/model.keras").get_weights()


def without_timing(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "train_seconds"}


# A learning rate at which the tiny project's dev loss is lowest in epoch 2 and higher in each of epochs 3 and 4:
# train.patience 1 stops after epoch 3, patience 2 after epoch 4.
OVERFITTING = {"learning_rate": 0.05, "epochs": 4}
