"""Image features: the tf.data input pipeline through a frozen backbone (backbones.py), and the feature files.

Output layout (one folder):
  features.npy    float32 (n_images, feature size), one row per image, read back with np.memmap
  index.parquet   image -> row
  backbone.json   how the backbone was built (network, weights, seed, precision, image size), so the
                  caption command can rebuild exactly the same one
and a report (returned; the stage writes it beside the folder): images requested / extracted / failed (each
failure with its reason), and the time taken
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from captioning import files
from captioning.backbones import build_backbone, feature_dim
from captioning.errors import UserError
from captioning.feature_files import FEATURE_FILES, BackboneSpec, first_few, nonfinite_rows
from captioning.images import ImageError, load_image
from captioning.layout import BACKBONE_SPEC, FEATURE_INDEX, FEATURE_MATRIX
from captioning.params import missing_images_folder
from captioning.tf_setup import keras, tf
from captioning.timing import Stopwatch


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


class FeatureComputer:
    """The backbone traced once for any batch size, and the loop that fills feature rows.

    Built once per process (a local run, or each Ray actor in extract_ray.py), so that every
    engine computes a batch the same way and gets the same bytes.
    """

    def __init__(self, backbone: keras.Model, image_size: int):
        # A fixed signature with any batch size: traced once, not again for the smaller last batch.
        signature = [tf.TensorSpec((None, image_size, image_size, 3), tf.uint8)]
        self.traced = tf.function(lambda x: backbone(x, training=False), input_signature=signature)
        self.image_size, self.name, self.dim = image_size, backbone.name, backbone.output_shape[-1]

    def forward(self, images):
        # oneDNN picks other kernels for a batch of one, which shifts features by ~1e-5: enough to
        # flip a close beam decision. Batches of 2+ agree bit for bit, so a lone image gets a twin,
        # and the caption command then reproduces evaluate's captions exactly.
        if len(images) == 1:
            return self.traced(tf.concat([images, images], axis=0))[:1]
        return self.traced(images)

    def fill(self, paths: list[str], batch_size: int, out: np.ndarray, progress: bool = True) -> dict[int, str]:
        """Write one feature row per path into `out` (an array or memmap); return {row: error}."""
        errors: dict[int, str] = {}
        row = 0
        with tqdm(total=len(paths), desc=f"{self.name}", unit="img", disable=not progress) as bar:
            for images, batch_errors in _image_dataset(paths, self.image_size, batch_size):
                out[row:row + len(images)] = self.forward(images).numpy()
                for offset, error in enumerate(batch_errors.numpy()):
                    if error:
                        errors[row + offset] = error.decode()
                row += len(images)
                bar.update(len(images))
        return errors


def compute_features(backbone: keras.Model, paths: list[str], image_size: int, batch_size: int,
                     out: np.ndarray, progress: bool = True) -> dict[int, str]:
    """Write one feature row per path into `out` (an array or memmap); return {row: error}."""
    return FeatureComputer(backbone, image_size).fill(paths, batch_size, out, progress)


# (paths, out) -> {row: error}: fills `out` with one feature row per path, on whichever engine.
ComputeRows = Callable[[list[str], np.ndarray], dict[int, str]]


def extract_features(images: list[str], images_dir: Path, out_dir: Path, spec: BackboneSpec,
                     batch_size: int, compute_rows: ComputeRows | None = None,
                     engine_report: Callable[[], dict] | None = None) -> dict:
    """Extract features for `images` (names inside `images_dir`) into `out_dir`; return the report.

    Images that fail to decode are left out of the index and listed in the report with the reason.
    When none decodes, that is an error.
    `compute_rows` computes the rows elsewhere (extract_ray.py); by default this process builds the
    backbone and computes them. Its `engine_report()` (what happened on the cluster) joins the report.
    """
    if not images:
        raise UserError("no images to extract features for: the captions table is empty.")
    if not Path(images_dir).is_dir():
        raise missing_images_folder(images_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier run's files go first, and the feature matrix is written last: a run killed half-way leaves an
    # incomplete folder (which FeatureStore refuses), never one run's index beside another's features.
    for name in FEATURE_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if compute_rows is None:
        computer = FeatureComputer(build_backbone(spec), spec.image_size)
        compute_rows = lambda paths, out: computer.fill(paths, batch_size, out)  # noqa: E731
    paths = [str(Path(images_dir) / name) for name in images]
    raw_path = out_dir / ".features.raw.npy.tmp"
    try:
        with Stopwatch() as watch:
            raw = np.lib.format.open_memmap(raw_path, mode="w+", dtype=np.float32,
                                            shape=(len(paths), feature_dim(spec)))
            errors = compute_rows(paths, raw)
            raw.flush()
        good = [row for row in range(len(paths)) if row not in errors]
        if not good:
            raise UserError(f"none of the {len(paths)} images in {images_dir} could be decoded; "
                            f"first error: {images[0]}: {errors[0]}")
        refuse_nonfinite(raw, good, images, spec)
        files.write_parquet(out_dir / FEATURE_INDEX,
                            pd.DataFrame({"image": [images[r] for r in good], "row": np.arange(len(good))}))
        files.write_json(out_dir / BACKBONE_SPEC, spec.to_json())
        if errors:
            _write_rows(raw, good, out_dir / FEATURE_MATRIX)
        else:
            del raw
            os.replace(raw_path, out_dir / FEATURE_MATRIX)  # complete, so the rename is the commit
    finally:
        raw_path.unlink(missing_ok=True)
    report = {
        "images_requested": len(images),
        "images_extracted": len(good),
        "failed_count": len(errors),
        "failed": [{"image": images[row], "reason": reason} for row, reason in sorted(errors.items())],
        "backbone": spec.to_json(),
        "seconds": round(watch.seconds, 2),
        "images_per_second": round(len(images) / watch.seconds, 2),
        **({"engine": engine_report()} if engine_report else {}),
    }
    return report


def refuse_nonfinite(raw: np.ndarray, good: list[int], images: list[str], spec: BackboneSpec) -> None:
    """Stop, before any file is written, when the backbone gave NaN or inf features: they would train
    silently into garbage (or stop training at a NaN loss that blames the learning rate)."""
    bad = [images[row] for row in nonfinite_rows(raw, good)]
    if bad:
        raise UserError(f"{len(bad)} of {len(good)} images got NaN or inf features from the {spec.backbone} backbone "
                        f"({first_few(bad)}): its weights ({spec.weights}) are likely damaged or not of this network, "
                        f"or features.precision {spec.precision} overflowed. Check features.weights and "
                        "features.precision, then extract again; nothing was written.")


def _write_rows(source: np.ndarray, rows: list[int], path: Path, chunk: int = 4096) -> None:
    """Copy the good rows into the final file in chunks, never holding all features in memory."""
    with files.atomic_path(path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), source.shape[1]))
        for start in range(0, len(rows), chunk):
            picked = rows[start:start + chunk]
            out[start:start + len(picked)] = source[picked]
        out.flush()
        del out
