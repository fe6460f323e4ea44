"""What the benchmarks share: the project's params, the demo data, a feature store, medians.

Sizes come from the caller (quick or full run); every hyper-parameter comes from params.yaml, so
the benchmarks measure the configuration the pipeline actually runs, never one tuned for them.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pandas as pd

from captioning import files, layout
from captioning.captions import load_captions
from captioning.demo import CAPTIONS, generate_demo
from captioning.feature_files import BackboneSpec
from captioning.params import load_params
from captioning.tiny_project import PROJECT as ROOT

PARAMS = load_params(ROOT / "params.yaml")
FEATURE_DIM = 2048  # ResNet-50's pooled feature size (captioning.features.FEATURE_DIM, without importing TF)


def median(values) -> float:
    return float(statistics.median(values))


def demo_data(out_dir: Path, n_images: int, image_size: int | None = None) -> tuple[pd.DataFrame, Path]:
    """The offline demo dataset (JPEGs + captions), read back by the pipeline's own parser."""
    demo = PARAMS["demo"]
    generate_demo(out_dir, n_images=n_images, image_size=image_size or demo["image_size"], seed=demo["seed"])
    table, _ = load_captions(out_dir / CAPTIONS, out_dir / "images")
    return table, out_dir / "images"


def random_feature_dir(folder: Path, images: list[str], seed: int = 0) -> Path:
    """A features folder in the pipeline's layout holding seeded random rows.

    Training and decoding speed do not depend on the feature values, so the decoder benchmarks
    skip the slow ResNet pass; both sides of each comparison read the very same rows. The folder says
    it was made by params.yaml's randomly initialised ResNet-50 (the network whose rows have this
    size), so a model trained on it is served with that backbone.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.abs(np.random.default_rng(seed).normal(size=(len(images), FEATURE_DIM))).astype(np.float32)
    np.save(folder / layout.FEATURE_MATRIX, rows)
    files.write_parquet(folder / layout.FEATURE_INDEX, pd.DataFrame({"image": images, "row": np.arange(len(images))}))
    options = PARAMS["features"]
    spec = BackboneSpec(weights="random", seed=options["seed"], image_size=options["image_size"],
                        precision=options["precision"], backbone="resnet50")
    files.write_json(folder / layout.BACKBONE_SPEC, spec.to_json())
    return folder
