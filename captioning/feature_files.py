"""The feature folder as later stages read it, without TensorFlow: what made the features
(BackboneSpec, saved as backbone.json) and read access by image name (FeatureStore).

Kept apart from features.py (extraction, which needs TensorFlow and the backbones) so that training,
evaluation and merging depend only on the format of the folder, not on how it was extracted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from captioning import files
from captioning.errors import UserError


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines the feature of an image; saved beside the features."""

    weights: str  # imagenet | random | path to a Keras weights file
    seed: int
    image_size: int
    precision: str
    weights_sha256: str | None = None  # of the weights file, or of the package checkpoint
    backbone: str = "resnet50"  # resnet50 | efficientnet_lite0 (older backbone.json files have no key)

    def to_json(self) -> dict:
        return asdict(self)


FEATURE_FILES = ("features.npy", "index.parquet", "backbone.json")  # features.npy is written last


class FeatureStore:
    """Read-only access to extracted features by image name, through a memory map."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        missing = [name for name in FEATURE_FILES if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder} lacks {', '.join(missing)}: feature extraction did not finish. Run "
                            "`dvc repro` (or `dvc repro -f extract_resnet_features`) to extract them again.")
        self.matrix = np.load(folder / "features.npy", mmap_mode="r", allow_pickle=False)
        index = pd.read_parquet(folder / "index.parquet")
        self.row_of = dict(zip(index["image"], index["row"].astype(int), strict=True))
        self.spec = BackboneSpec(**files.read_json(folder / "backbone.json"))

    def rows(self, images) -> np.ndarray:
        return np.array([self.row_of[name] for name in images], dtype=np.int64)

    def get(self, images) -> np.ndarray:
        return np.asarray(self.matrix[self.rows(images)], dtype=np.float32)
