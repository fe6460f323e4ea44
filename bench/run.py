"""Run every benchmark and write bench/results.json (a table of the figures is printed at the end).

    .venv/bin/python bench/run.py            # full sizes, 9-20 min on 2 shared cores
    .venv/bin/python bench/run.py --quick    # small sizes, a few minutes

Every figure is the median of several repeats (warm-ups and tracing left out) with the raw numbers
beside it; ratios compare two sides measured in the same process, on the same inputs, one after the
other (the median of the per-repeat ratios, or where the sides' repeats are not paired one to one, the
ratio of their medians). Values are wall clock; where it applies, `cpu_time_value` gives the same ratio in CPU seconds
of the process, which other jobs on shared cores hardly disturb (on a shared machine wall-clock
ratios swing by 2x between repeats; the CPU ratios stay within a few percent).

A benchmark that fails is reported, not dropped: its keys get `"value": null`, `"meets_goal": false` and
an `error`, the others still run, the JSON is written, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

from common import ROOT  # bench/ is this script's folder, so Python finds its modules

from captioning.errors import one_line
from captioning.timing import Stopwatch

# Sizes per mode; the hyper-parameters themselves come from params.yaml.
SIZES = {  # run in this order, each by bench/bench_<name>.py
    "quick": {"pipeline": dict(n_images=40, repeats=1, noop_repeats=3),
              "scoring": dict(n_images=100, repeats=1),
              # 2 timed batches per side (the first, with tracing, is left out), median of 3 repeats. With 64
              # images x 2 (one timed batch) extract and bf16 swung 0.94-1.13 and 1.44-1.70 over 4 runs,
              # with these 0.99-1.05 and 1.45-1.53
              "extract": dict(n_images=96, repeats=3),
              # 24 batches: the rate is timed from the first rows to the last, a window of ~18 s here; with 8
              # (256 images, a ~5 s window) the ratio swung 0.83-1.32 over 4 runs, with 24 0.82-1.01 over 8
              "engine": dict(n_images=768, repeats=1),
              "train": dict(n_images=100, pairs=3),
              "beam": dict(n_images=100, loop_images=20, train_epochs=2, repeats=3, loop_chunks=2),
              "serve": dict(n_images=32, lone=20, burst=48, rss_early=100, rss_total=300, repeats=2)},
    "full": {"pipeline": dict(n_images=150, repeats=3, noop_repeats=5),
             "scoring": dict(n_images=500, repeats=3),
             "extract": dict(n_images=192, repeats=4),
             "engine": dict(n_images=384, repeats=2),
             "train": dict(n_images=200, pairs=8),
             "beam": dict(n_images=500, loop_images=100, train_epochs=3, repeats=5, loop_chunks=5),
             "serve": dict(n_images=64, lone=100, burst=320, rss_early=100, rss_total=2000, repeats=3)},
}
GOALS = {  # key: (comparison, threshold)
    "extract_ratio": (">=", 0.9), "bf16_speedup": (">=", 1.4), "bf16_cosine": (">=", 0.999),
    "efficientnet_speedup": (">=", 1.5), "efficientnet_288_speedup": (">=", 1.5),
    "ray_engine_ratio": (">=", 0.85),
    "train_speedup": (">=", 7.0), "beam_speedup": (">=", 10.0), "rss_growth": ("<=", 1.25),
    "noop_repro_s": ("<", 3.0), "split_imports_tensorflow": ("==", False), "meteor_reuse_speedup": (">=", 2.0),
    "serve_throughput_ratio": (">=", 0.7), "serve_errors": ("==", 0), "serve_rss_growth": ("<=", 1.1),
}
KEYS = {  # the figures each bench/bench_<name>.py returns: a failed or incomplete benchmark's keys are named
    "pipeline": ("rss_growth", "noop_repro_s", "split_imports_tensorflow"),
    "scoring": ("meteor_reuse_speedup",),
    "extract": ("extract_ratio", "bf16_speedup", "efficientnet_speedup", "efficientnet_288_speedup", "bf16_cosine"),
    "engine": ("ray_engine_ratio",),
    "train": ("train_speedup",),
    "beam": ("beam_speedup",),
    "serve": ("serve_throughput_ratio", "serve_errors", "serve_rss_growth"),
}


def meets(value, comparison: str, threshold) -> bool:
    return {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold,
            "==": value == threshold}[comparison]


def table(results: dict) -> str:
    """value = wall clock; cpu = the same ratio in CPU seconds of the process, where measured."""
    lines = [f"{'figure':<26}{'value':>9}{'cpu':>9}  {'goal':<10}status"]
    for key, (comparison, threshold) in GOALS.items():
        entry = results[key]
        value = entry["value"]
        goal = f"{comparison} {str(threshold).lower() if isinstance(threshold, bool) else threshold}"
        if "error" in entry:
            lines.append(f"{key:<26}{'-':>9}{'-':>9}  {goal:<10}FAILED: {entry['error']}")
            continue
        shown = str(value).lower() if isinstance(value, bool) else f"{value:.3f}"
        cpu = f"{entry['cpu_time_value']:.3f}" if "cpu_time_value" in entry else "-"
        lines.append(f"{key:<26}{shown:>9}{cpu:>9}  {goal:<10}{'ok' if entry['meets_goal'] else 'SHORT OF GOAL'}")
    return "\n".join(lines)


def run_benchmark(name: str, workdir: Path, sizes: dict) -> dict:
    """One benchmark's figures; if it fails (a crash, an assertion of its correctness checks, a figure it
    did not return), each of its keys records why instead. A full run takes 9-20 min: one benchmark's
    failure near the end used to end the run with a traceback and lose every other figure."""
    try:
        module = importlib.import_module(f"bench_{name}")
        figures = module.run(workdir, **sizes)
    except Exception as err:  # noqa: BLE001 - any failure is reported in the JSON and the table, not raised
        traceback.print_exc()
        error = f"bench_{name} failed: {type(err).__name__}: {one_line(err)}"
        return {key: {"value": None, "error": error} for key in KEYS[name]}
    missing = [key for key in KEYS[name] if key not in figures]
    return {**figures, **{key: {"value": None, "error": f"bench_{name} did not return it"} for key in missing}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    workdir = ROOT / "bench" / "run.tmp"  # git-ignored (bench/*.tmp/)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    results: dict = {}
    seconds: dict = {}
    for name in sizes:  # the pipeline first: TensorFlow is not imported in this process before it ends
        print(f"[bench] {name} ...", flush=True)
        with Stopwatch() as watch:
            results.update(run_benchmark(name, workdir / name, sizes[name]))
        seconds[name] = round(watch.seconds, 1)
        print(f"[bench] {name} done in {seconds[name]} s", flush=True)

    for key, (comparison, threshold) in GOALS.items():
        failed = "error" in results[key]
        results[key] = {"value": results[key]["value"], "goal": f"{comparison} {json.dumps(threshold)}",
                        "meets_goal": not failed and bool(meets(results[key]["value"], comparison, threshold)),
                        **{k: v for k, v in results[key].items() if k != "value"}}
    report = {
        **{key: results[key] for key in GOALS},
        "run": {"mode": mode, "sizes": sizes, "seconds": seconds, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
                "notes": "2 shared CPU cores; features.weights random; medians of repeats, raw figures under raw"},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    print(table(report))
    print(f"written {args.out}")
    failed = sorted({name for name, keys in KEYS.items() for key in keys if "error" in report[key]})
    if failed:  # the figures that were measured are written; the exit status says the run is incomplete
        print(f"failed: {', '.join(failed)} (see the traceback above and `error` in {args.out})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
