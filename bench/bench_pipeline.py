"""The real pipeline in tiny project copies (captioning.tiny_project.make_project: 64 px images, 16-unit
LSTMs, 2 epochs): peak memory of the heavy stages at 1x and 4x the demo data, the time of a
`dvc repro` with nothing to do, and whether the light stages import TensorFlow.

Peak RSS is measured around `dvc repro -s <stage>` with getrusage(RUSAGE_CHILDREN) in a fresh
wrapper process: the largest resident set of dvc and the stage it runs (the stage, by far). The
1x and 4x projects are built and measured side by side (memory does not depend on CPU share);
the no-op `dvc repro` is timed afterwards, alone.
"""
from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import median

from captioning import tiny_project
from captioning.timing import Stopwatch
from captioning.tiny_project import make_project
from captioning.tiny_project import run as run_command

HEAVY_STAGES = ("extract_resnet_features", "train_lstm")
# What the projects are, for results.json: derived from the module itself, so the file it names stays true
# (it named tests/conftest.py after TINY_PARAMS had moved to the package).
TINY = tiny_project.TINY_PARAMS
PROJECT_NOTE = (f"{Path(tiny_project.__file__).resolve().relative_to(tiny_project.PROJECT).as_posix()} TINY_PARAMS "
                f"({TINY['demo']['image_size']} px images, {TINY['train']['units']} units, "
                f"{TINY['train']['epochs']} epochs)")
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
IMPORTS_TF = ("import runpy, sys; runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True); "
              "print('tensorflow' in sys.modules)")


def peak_rss_mb(args: list[str], cwd: Path) -> float:
    return int(run_command([sys.executable, "-c", PEAK_RSS, *args], cwd).stdout.split()[-1]) / 1024  # KiB on Linux


def stage_rss(project: Path, repeats: int) -> dict[str, list[float]]:
    run_command(["dvc", "repro", "split"], project)
    rss = {stage: [] for stage in HEAVY_STAGES}
    for r in range(repeats):
        # A forced rerun of train_lstm would resume from its persistent checkpoint and train nothing.
        shutil.rmtree(project / "checkpoints", ignore_errors=True)
        for stage in HEAVY_STAGES:
            rss[stage].append(peak_rss_mb(["dvc", "repro", "-s", *(["-f"] if r else []), stage], project))
    return rss


def run(workdir: Path, n_images: int, repeats: int, noop_repeats: int) -> dict:
    def small_project():
        project = make_project(workdir / "x1", {"demo": {"n_images": n_images}})
        rss = stage_rss(project, repeats)
        run_command(["dvc", "repro"], project)  # the rest of the pipeline, so that everything is up to date
        return project, rss

    def large_project():
        return stage_rss(make_project(workdir / "x4", {"demo": {"n_images": 4 * n_images}}), repeats)

    # The two projects run side by side: that costs wall time only, and only timings are taken later.
    with ThreadPoolExecutor(2) as pool:
        small_job, large_job = pool.submit(small_project), pool.submit(large_project)
        (small, rss_x1), rss_x4 = small_job.result(), large_job.result()
    rss = {"x1": rss_x1, "x4": rss_x4}
    ratios = {stage: median(rss["x4"][stage]) / median(rss["x1"][stage]) for stage in HEAVY_STAGES}

    imports = {stage: run_command([sys.executable, "-c", IMPORTS_TF, f"stages.{stage}"], small).stdout.split()[-1]
               == "True" for stage in ("parse_pickle", "split")}
    run_command(["dvc", "repro"], small)  # warm-up (re-checks the outputs the import check rewrote)
    noop = []
    for _ in range(noop_repeats):
        with Stopwatch() as watch:
            output = run_command(["dvc", "repro"], small).stdout
        noop.append(watch.seconds)
        assert "Running stage" not in output, output
    return {
        "rss_growth": {
            "value": max(ratios.values()), **ratios,
            "raw": {"peak_rss_mb": rss, "images": {"x1": n_images, "x4": 4 * n_images}, "repeats": repeats,
                    "project": PROJECT_NOTE},
        },
        "noop_repro_s": {"value": median(noop), "raw": {"seconds": noop, "images": n_images}},
        "split_imports_tensorflow": {"value": imports["split"],
                                     "raw": {"parse_pickle_imports_tensorflow": imports["parse_pickle"]}},
    }
