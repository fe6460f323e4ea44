"""The feature folder as later stages read it, without TensorFlow: what made the features
(BackboneSpec, saved as backbone.json) and read access by image name (FeatureStore).

Kept apart from features.py (extraction, which needs TensorFlow and the backbones) so that training,
evaluation and merging depend only on the format of the folder, not on how it was extracted.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from captioning import files
from captioning.errors import UserError
from captioning.layout import BACKBONE_SPEC, EXTRACT_REPORT, FEATURE_INDEX, FEATURE_MATRIX


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

    def check_weights_file(self, *, missing_ok: bool = False) -> None:
        """Stop when the weights file these features were extracted with holds other bytes now (or is gone,
        unless `missing_ok`: training and scoring read only the features). DVC cannot see the change:
        `features.weights` is a keyword or a path, and dvc.yaml cannot list a dependency only when it is a
        path, so a file replaced at the same path reruns no stage; every reader of the features checks here."""
        if self.weights in ("imagenet", "random") or self.weights_sha256 is None:
            return
        if not Path(self.weights).is_file():
            if missing_ok:
                return
            raise UserError(f"the weights file {self.weights} that these features were made with is gone; restore "
                            "it or re-extract with `dvc repro`.")
        now = files.sha256(self.weights)
        if now != self.weights_sha256:
            raise UserError(f"the weights file {self.weights} changed since the features were extracted (sha256 "
                            f"{self.weights_sha256[:12]}... then, {now[:12]}... now), which DVC cannot see: re-extract "
                            "with `dvc repro -f -s extract_resnet_features`, then `dvc repro`.")


FEATURE_FILES = (FEATURE_MATRIX, FEATURE_INDEX, BACKBONE_SPEC)  # FEATURE_MATRIX is written last


class FeatureStore:
    """Read-only access to extracted features by image name, through a memory map."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        missing = [name for name in FEATURE_FILES if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder} lacks {', '.join(missing)}: feature extraction did not finish. Run "
                            "`dvc repro` (or `dvc repro -f extract_resnet_features`) to extract them again.")
        # Each file whole and the two agreeing, or one line naming the file: a folder copied in part (an
        # interrupted copy, a full disk) has every file but not every file's bytes, and training and
        # evaluation stopped with a NumPy, Arrow or JSON traceback, or an IndexError epochs later.
        name = FEATURE_MATRIX
        try:
            self.matrix = np.load(folder / name, mmap_mode="r", allow_pickle=False)
            name = FEATURE_INDEX
            index = pd.read_parquet(folder / name)
            rows = index["row"].to_numpy(dtype=np.int64)
            self.row_of = dict(zip(index["image"], rows.tolist(), strict=True))
            name = BACKBONE_SPEC
            self.spec = BackboneSpec(**files.read_json(folder / name))
        except (OSError, ValueError, TypeError, KeyError) as err:  # ArrowInvalid is a ValueError
            raise _damaged(folder / name, f"{type(err).__name__}: {err}") from None
        self.spec.check_weights_file(missing_ok=True)  # features of other weights must not train or be scored
        if self.matrix.ndim != 2 or len(self.matrix) != len(index) or \
                not np.array_equal(np.sort(rows), np.arange(len(index))):
            raise _damaged(folder / FEATURE_MATRIX, f"{self.matrix.shape} features for the {len(index)} rows "
                                                  f"of {FEATURE_INDEX}")
        # Extraction refuses NaN/inf features, but a folder from before that check (or edited since) may
        # hold them: training would stop at a NaN loss that blames the learning rate, and evaluation would
        # write garbage captions without a word.
        bad_rows = nonfinite_rows(self.matrix)
        if bad_rows:  # the row -> image map only then: opening a sound folder builds none
            image_of = {row: image for image, row in self.row_of.items()}
            bad = [image_of[row] for row in bad_rows]
            raise UserError(f"{folder / FEATURE_MATRIX} holds NaN or inf features for {len(bad)} images "
                            f"({first_few(bad)}): a damaged backbone weights file gives them. Check features.weights "
                            "and run `dvc repro -f extract_resnet_features`.")

    def without_features(self, images, split: str, consequence: str, stage: str) -> list[str]:
        """The photos of `images` whose extraction failed (listed in the extract report), sorted; when there
        are any, one stderr line names them and says what `stage` does without them: results over fewer
        photos than the split holds must not pass for results over all of them."""
        missing = sorted(name for name in set(images) if name not in self.row_of)
        if missing:
            print(f"{stage}: {len(missing)} {split} images have no features (see {EXTRACT_REPORT}) and {consequence}: "
                  f"{first_few(missing)}", file=sys.stderr, flush=True)
        return missing

    def rows(self, images) -> np.ndarray:
        return np.array([self.row_of[name] for name in images], dtype=np.int64)

    def get(self, images) -> np.ndarray:
        return np.asarray(self.matrix[self.rows(images)], dtype=np.float32)


def nonfinite_rows(matrix: np.ndarray, rows=None, chunk: int = 4096) -> list[int]:
    """The rows of `matrix` (all, or those of `rows`) holding a NaN or inf, read in chunks: memory stays flat."""
    rows = np.arange(len(matrix)) if rows is None else np.asarray(rows, np.int64)
    bad: list[int] = []
    for start in range(0, len(rows), chunk):
        picked = rows[start:start + chunk]
        bad.extend(picked[~np.isfinite(np.asarray(matrix[picked])).all(axis=1)].tolist())
    return bad


def first_few(names: list[str], shown: int = 10) -> str:
    """The first `shown` of `names` for a one-line message, "..." when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _damaged(path: Path, reason: str) -> UserError:
    return UserError(f"{path} is damaged ({reason}): the feature folder was not copied or restored whole. "
                     "Run `dvc repro -f extract_resnet_features` (or `dvc checkout data/features`).")
