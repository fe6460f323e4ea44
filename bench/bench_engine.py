"""The Ray engine's overhead: its extraction throughput over the local engine's, same machine, same
images, same params (features.*), measured one after the other in this process.

Both sides run the real extract_features into a features folder; the memory-mapped raw file it
hands to the engine is wrapped so we note when rows land. `steady` counts images/s from the first
rows to the last (a long run's rate: backbone builds and tracing left out on both sides); the whole
call (Ray: actor start-up, TensorFlow import in each worker; local: one backbone build) is beside it.
The Ray cluster is started once, before both, with one worker per CPU of this machine, as
`ray start --head` would; starting it (~10 s) is a one-off per cluster, not per run, and left out.
Ray's workers are other processes, so there is no CPU-time ratio for this figure.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from common import PARAMS, demo_data, median

from captioning.backbones import build_backbone, make_spec
from captioning.extract_ray import RayEngine
from captioning.feature_files import FEATURE_FILES
from captioning.features import FeatureComputer, extract_features
from captioning.timing import Stopwatch


class LandingTimes:
    """Wraps `out`: notes (seconds, rows so far) whenever rows are written, by slice or by index."""

    def __init__(self, array: np.ndarray):
        self.array, self.watch, self.marks, self.rows = array, Stopwatch(), [], 0

    def __setitem__(self, rows, values):
        self.array[rows] = values
        self.rows += len(values)
        self.marks.append((self.watch.elapsed, self.rows))

    def __getattr__(self, name):  # flush(), shape, ... of the memmap
        return getattr(self.array, name)

    def __getitem__(self, rows):
        return self.array[rows]


def timed(call) -> dict:
    """Run `call(wrap)` where `wrap` times the rows written; return its rates."""
    landed: list[LandingTimes] = []

    def wrap(array):
        landed.append(LandingTimes(array))
        return landed[-1]

    with Stopwatch() as watch:
        call(wrap)
    marks = landed[-1].marks
    (t1, n1), (t_end, n_end) = marks[0], marks[-1]
    return {"steady": (n_end - n1) / (t_end - t1), "whole_call": n_end / watch.seconds, "seconds": watch.seconds}


def run(workdir: Path, n_images: int, repeats: int) -> dict:
    from ray.cluster_utils import Cluster

    options = PARAMS["features"]
    spec = make_spec("random", options["seed"], options["image_size"], options["precision"])
    batch_size = options["batch_size"]
    table, images_dir = demo_data(workdir / "demo", n_images)
    images = sorted(table["image"].unique())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": os.cpu_count(), "include_dashboard": False})
    engines = {}

    def local(wrap):
        computer = FeatureComputer(build_backbone(spec), spec.image_size)
        extract_features(images, images_dir, workdir / "local", spec, batch_size,
                         compute_rows=lambda paths, out: computer.fill(paths, batch_size, wrap(out), progress=False))

    def on_ray(wrap):
        engine = engines["ray"] = RayEngine(spec, batch_size, cluster.address, progress=False)
        extract_features(images, images_dir, workdir / "ray", spec, batch_size,
                         compute_rows=lambda paths, out: engine(paths, wrap(out)))

    raw = {"local": [], "ray": []}
    try:
        for r in range(repeats):
            for name in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
                raw[name].append(timed(local if name == "local" else on_ray))
    finally:
        cluster.shutdown()
    same = all((workdir / "local" / f).read_bytes() == (workdir / "ray" / f).read_bytes()
               for f in FEATURE_FILES)
    ratios = [r["steady"] / loc["steady"] for r, loc in zip(raw["ray"], raw["local"], strict=True)]
    return {"ray_engine_ratio": {
        "value": median(ratios),
        "images_per_second": {"ray_steady": median([r["steady"] for r in raw["ray"]]),
                              "local_steady": median([loc["steady"] for loc in raw["local"]])},
        "whole_call_ratio": median([r["whole_call"] / loc["whole_call"]
                                    for r, loc in zip(raw["ray"], raw["local"], strict=True)]),
        "raw": {"ratio_per_repeat": ratios, "ray": raw["ray"], "local": raw["local"], "images": len(images),
                "batch_size": batch_size, "image_size": spec.image_size, "workers": engines["ray"].workers,
                "identical_files": same, "repeats": repeats},
    }}
