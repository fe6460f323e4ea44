"""ResNet-50 image features: the backbone, the tf.data input pipeline, and the feature files.

Output layout (one folder):
  features.npy    float32 (n_images, 2048), one row per image, read back with np.memmap
  index.parquet   image -> row
  backbone.json   how the backbone was built (weights, seed, precision, image size), so the
                  caption command can rebuild exactly the same one
  report.json     images requested / extracted / failed (each failure with its reason)
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from captioning import files
from captioning.errors import UserError
from captioning.images import ImageError, load_image
from captioning.params import SCHEMA, WEIGHTS_HINT
from captioning.tf_setup import keras, seed_everything, tf

FEATURE_DIM = 2048


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines the feature of an image; saved beside the features."""

    weights: str  # imagenet | random | path to a weights file
    seed: int
    image_size: int
    precision: str
    weights_sha256: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def make_spec(weights: str, seed: int, image_size: int, precision: str) -> BackboneSpec:
    """Check the settings by params.yaml's rules for `features` and hash a weights file."""
    given = {"weights": weights, "seed": seed, "image_size": image_size, "precision": precision}
    checked = {key: SCHEMA["features"][key](value, f"features.{key}") for key, value in given.items()}
    if checked["weights"] in ("imagenet", "random"):
        return BackboneSpec(**checked)
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    return BackboneSpec(**checked, weights_sha256=digest)


def build_backbone(spec: BackboneSpec) -> keras.Model:
    """ResNet-50 without its classifier, average-pooled to 2048 numbers, preprocessing included."""
    keras.mixed_precision.set_global_policy(spec.precision)
    try:
        seed_everything(spec.seed)  # random init is bitwise reproducible from this seed
        weights = None if spec.weights == "random" else spec.weights
        try:
            resnet = keras.applications.ResNet50(
                include_top=False, weights=weights, pooling="avg",
                input_shape=(spec.image_size, spec.image_size, 3),
            )
        except Exception as err:  # download failures surface as many exception types
            if spec.weights == "imagenet":
                raise UserError(f"could not get the ImageNet ResNet-50 weights ({err}). {WEIGHTS_HINT}") from None
            if spec.weights != "random":
                raise UserError(f"could not load ResNet-50 weights from {spec.weights} ({err}). "
                                "It must be a no-top ResNet-50 weights file (.h5 / .weights.h5).") from None
            raise
        pixels = keras.Input((spec.image_size, spec.image_size, 3), dtype="uint8", name="pixels")
        x = keras.applications.resnet50.preprocess_input(keras.ops.cast(pixels, "float32"))
        features = keras.ops.cast(resnet(x, training=False), "float32")
        return keras.Model(pixels, features, name="resnet50_features")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _image_dataset(paths: list[str], image_size: int, batch_size: int) -> tf.data.Dataset:
    """Decode in parallel threads (Pillow releases the GIL), batch, and prefetch so decoding
    overlaps the network and extraction runs at the network's speed."""

    def load(path: bytes):
        try:
            return load_image(path.decode(), image_size), b""
        except ImageError as err:
            return np.zeros((image_size, image_size, 3), np.uint8), str(err).encode()

    def load_tf(path):
        image, error = tf.numpy_function(load, [path], (tf.uint8, tf.string), stateful=False)
        image.set_shape((image_size, image_size, 3))
        error.set_shape(())
        return image, error

    return (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def compute_features(backbone: keras.Model, paths: list[str], image_size: int, batch_size: int,
                     out: np.ndarray, progress: bool = True) -> dict[int, str]:
    """Write one feature row per path into `out` (an array or memmap); return {row: error}."""
    # A fixed signature with any batch size: traced once, not again for the smaller last batch.
    signature = [tf.TensorSpec((None, image_size, image_size, 3), tf.uint8)]
    traced = tf.function(lambda x: backbone(x, training=False), input_signature=signature)

    def forward(images):
        # oneDNN picks other kernels for a batch of one, which shifts features by ~1e-5: enough to
        # flip a close beam decision. Batches of 2+ agree bit for bit, so a lone image gets a twin,
        # and the caption command then reproduces evaluate's captions exactly.
        if len(images) == 1:
            return traced(tf.concat([images, images], axis=0))[:1]
        return traced(images)

    errors: dict[int, str] = {}
    row = 0
    with tqdm(total=len(paths), desc="ResNet-50 features", unit="img", disable=not progress) as bar:
        for images, batch_errors in _image_dataset(paths, image_size, batch_size):
            out[row:row + len(images)] = forward(images).numpy()
            for offset, error in enumerate(batch_errors.numpy()):
                if error:
                    errors[row + offset] = error.decode()
            row += len(images)
            bar.update(len(images))
    return errors


def extract_features(images: list[str], images_dir: Path, out_dir: Path, spec: BackboneSpec,
                     batch_size: int, allow_all_failed: bool = False) -> dict:
    """Extract features for `images` (names inside `images_dir`) into `out_dir`; return the report.

    Images that fail to decode are left out of the index and listed in the report with the reason.
    When none decodes, that is an error, unless `allow_all_failed` (a shard of a larger run, see
    shards.py, may hold only bad images: the other shards have the good ones).
    """
    if not images:
        raise UserError("no images to extract features for: the captions table is empty.")
    if not Path(images_dir).is_dir():
        raise UserError(f"images folder not found: {images_dir}. Set data.images in params.yaml to the "
                        "folder holding the photos named in the captions file.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = build_backbone(spec)
    paths = [str(Path(images_dir) / name) for name in images]
    start = time.perf_counter()
    raw_path = out_dir / ".features.raw.npy.tmp"
    try:
        raw = np.lib.format.open_memmap(raw_path, mode="w+", dtype=np.float32, shape=(len(paths), FEATURE_DIM))
        errors = compute_features(backbone, paths, spec.image_size, batch_size, raw)
        raw.flush()
        seconds = time.perf_counter() - start
        good = [row for row in range(len(paths)) if row not in errors]
        if not good and not allow_all_failed:
            raise UserError(f"none of the {len(paths)} images in {images_dir} could be decoded; "
                            f"first error: {images[0]}: {errors[0]}")
        if errors:
            _write_rows(raw, good, out_dir / "features.npy")
        else:
            del raw
            os.replace(raw_path, out_dir / "features.npy")  # complete, so the rename is the commit
    finally:
        raw_path.unlink(missing_ok=True)
    files.write_parquet(out_dir / "index.parquet",
                        pd.DataFrame({"image": [images[r] for r in good], "row": np.arange(len(good))}))
    files.write_json(out_dir / "backbone.json", spec.to_json())
    report = {
        "images_requested": len(images),
        "images_extracted": len(good),
        "failed_count": len(errors),
        "failed": [{"image": images[row], "reason": reason} for row, reason in sorted(errors.items())],
        "backbone": spec.to_json(),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(images) / seconds, 2),
    }
    files.write_json(out_dir / "report.json", report)
    return report


def _write_rows(source: np.ndarray, rows: list[int], path: Path, chunk: int = 4096) -> None:
    """Copy the good rows into the final file in chunks, never holding all features in memory."""
    with files.atomic_path(path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), source.shape[1]))
        for start in range(0, len(rows), chunk):
            picked = rows[start:start + chunk]
            out[start:start + len(picked)] = source[picked]
        out.flush()
        del out


class FeatureStore:
    """Read-only access to extracted features by image name, through a memory map."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.matrix = np.load(folder / "features.npy", mmap_mode="r")
        index = pd.read_parquet(folder / "index.parquet")
        self.row_of = dict(zip(index["image"], index["row"].astype(int), strict=True))
        self.spec = BackboneSpec(**files.read_json(folder / "backbone.json"))

    def rows(self, images) -> np.ndarray:
        return np.array([self.row_of[name] for name in images], dtype=np.int64)

    def get(self, images) -> np.ndarray:
        return np.asarray(self.matrix[self.rows(images)], dtype=np.float32)
