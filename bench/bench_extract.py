"""Feature extraction: the real path (JPEG files -> features written) against the network alone,
mixed bfloat16 against float32, and the two backbones (EfficientNet-Lite0 against ResNet-50).

Five measurements per repeat, in rotating order so drifting machine load hits each alike:
  e2e        compute_features(): tf.data + Pillow decoding, the backbone, rows written to a .npy memmap
  fp32       the same float32 backbone on the same images already decoded into uint8 tensors in memory
  bf16       the mixed_bfloat16 backbone (same seed, so the same weights) on those tensors
  lite0      EfficientNet-Lite0 (float32, the package's ImageNet weights) on those tensors
  lite0_288  the same network on the same images decoded at 288 pixels, the input size of the README's
             "Real photos" block (1.65x the pixels of its native 224)
Same images, same batch size (features.batch_size), and the same image size (features.image_size) except
for lite0_288. Every side wraps the backbone in a fresh tf.function with the same signature, as
compute_features does; its first batch (the tracing, first use of the kernels) is left out of the rate,
and the rest are counted at the moment their rows land. Rates are wall clock; the same ratios in CPU
seconds of the process (all threads), which other jobs on shared cores hardly disturb, are reported as
`cpu_time_value`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from common import PARAMS, demo_data, median

from captioning.backbones import build_backbone, make_spec
from captioning.features import compute_features
from captioning.images import load_image
from captioning.tf_setup import tf
from captioning.timing import Stopwatch
from captioning.tiny_project import readme_real_photos

REAL_PHOTOS_SIZE = readme_real_photos()[0]["features"]["image_size"]  # the README's "Real photos" block


class TimedRows:
    """The `out` array handed to compute_features: it notes when each batch of rows lands (wall and CPU
    seconds since it was made, rows so far)."""

    def __init__(self, array: np.ndarray):
        self.array, self.watch, self.marks = array, Stopwatch(), [(0.0, 0.0, 0)]

    def __setitem__(self, rows: slice, values):
        self.array[rows] = values
        self.marks.append((self.watch.elapsed, self.watch.cpu_elapsed, rows.stop))


def rates(marks: list[tuple[float, float, int]]) -> dict:
    """Images/s after the first batch (steady state), over the whole call (tracing included), and
    steady images per CPU-second of the process (all threads; little disturbed by other jobs)."""
    (t0, _, _), (t1, c1, n1), (t_end, c_end, n_end) = marks[0], marks[1], marks[-1]
    return {"steady": (n_end - n1) / (t_end - t1), "with_tracing": n_end / (t_end - t0),
            "steady_per_cpu_second": (n_end - n1) / (c_end - c1)}


def forward(backbone, batches: list, out: np.ndarray) -> dict:
    size = batches[0].shape[1]
    traced = tf.function(lambda x: backbone(x, training=False),
                         input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)])
    rows = TimedRows(out)
    row = 0
    for batch in batches:
        rows[row:row + len(batch)] = traced(batch).numpy()
        row += len(batch)
    return rates(rows.marks)


def to_batches(paths: list[str], size: int, batch_size: int) -> list:
    pixels = np.stack([load_image(path, size) for path in paths])
    return [tf.constant(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]


def against_fp32(raw: dict, side: str, labels: tuple[str, str], ratio_key: str, extra: dict) -> dict:
    """One side's steady rate over the float32 ResNet-50 forward pass's, per repeat, in wall clock and in
    CPU seconds; `labels` name the two sides in the JSON, `extra` joins the raw figures."""
    def per_repeat(figure: str) -> list[float]:
        return [s[figure] / f[figure] for s, f in zip(raw[side], raw["fp32"], strict=True)]

    ratios = per_repeat("steady")
    return {
        "value": median(ratios),
        "cpu_time_value": median(per_repeat("steady_per_cpu_second")),
        "images_per_second": {label: median([figures["steady"] for figures in raw[key]])
                              for label, key in zip(labels, (side, "fp32"), strict=True)},
        "raw": {ratio_key: ratios, labels[0]: raw[side], labels[1]: raw["fp32"], **extra},
    }


def run(workdir: Path, n_images: int, repeats: int) -> dict:
    options = PARAMS["features"]
    size, batch_size = options["image_size"], options["batch_size"]
    table, images_dir = demo_data(workdir / "demo", n_images)
    paths = [str(images_dir / name) for name in sorted(table["image"].unique())]
    batches, batches_288 = (to_batches(paths, side, batch_size) for side in (size, REAL_PHOTOS_SIZE))
    backbones = {precision: build_backbone(make_spec("random", options["seed"], size, precision))
                 for precision in ("float32", "mixed_bfloat16")}
    lite0, lite0_288 = (build_backbone(make_spec("imagenet", 0, side, "float32", backbone="efficientnet_lite0"))
                        for side in (size, REAL_PHOTOS_SIZE))
    dim = backbones["float32"].output_shape[-1]
    outputs = {key: np.zeros((len(paths), dim), np.float32) for key in ("e2e", "fp32", "bf16")}
    lite0_out = np.zeros((len(paths), lite0.output_shape[-1]), np.float32)
    memmap = np.lib.format.open_memmap(workdir / "features.npy", mode="w+", dtype=np.float32, shape=(len(paths), dim))

    def e2e():
        rows = TimedRows(memmap)
        errors = compute_features(backbones["float32"], paths, size, batch_size, rows, progress=False)
        assert not errors, errors
        outputs["e2e"][:] = memmap
        return rates(rows.marks)

    sides = {"e2e": e2e,
             "fp32": lambda: forward(backbones["float32"], batches, outputs["fp32"]),
             "bf16": lambda: forward(backbones["mixed_bfloat16"], batches, outputs["bf16"]),
             "lite0": lambda: forward(lite0, batches, lite0_out),
             "lite0_288": lambda: forward(lite0_288, batches_288, lite0_out)}
    raw = {key: [] for key in sides}
    names = list(sides)
    for r in range(repeats):
        for key in names[r % len(names):] + names[:r % len(names)]:
            raw[key].append(sides[key]())
    a, b = outputs["fp32"], outputs["bf16"]
    cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    common = {"images": len(paths), "batch_size": batch_size, "image_size": size, "repeats": repeats,
              "weights": "random"}
    lite0_labels = ("efficientnet_lite0", "resnet50")
    lite0_common = {**common, "efficientnet_weights": "imagenet"}  # `weights` stays ResNet-50's
    return {
        "extract_ratio": against_fp32(raw, "e2e", ("end_to_end", "forward_only"), "ratio_per_repeat", {
            "e2e_equals_forward_max_abs_diff": float(np.max(np.abs(outputs["e2e"] - a))), **common}),
        "bf16_speedup": against_fp32(raw, "bf16", ("mixed_bfloat16", "float32"), "speedup_per_repeat", common),
        "efficientnet_speedup": against_fp32(raw, "lite0", lite0_labels, "speedup_per_repeat", lite0_common),
        "efficientnet_288_speedup": against_fp32(raw, "lite0_288", lite0_labels, "speedup_per_repeat",
                                                 {**lite0_common, "efficientnet_image_size": REAL_PHOTOS_SIZE}),
        "bf16_cosine": {
            "value": float(np.mean(cosine)),
            "raw": {"min": float(np.min(cosine)), "images": len(paths),
                    "relative_l2_error": float(np.linalg.norm(a - b) / np.linalg.norm(a))},
        },
    }
