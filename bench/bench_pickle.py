"""The captions pickle pre-scan and safe load against C `pickle.loads` of the same bytes.

`parse_pickle` reads a captions pickle with `safe_pickle.loads`, which first runs the pure-Python pre-scan
`pickle_scan.check_nesting` over every opcode and then the restricted unpickler. Both are measured here on
Flickr8k-style records (a Flickr photo name, a caption of 11 words) in the main shapes the README's Input
formats accept, pickled at protocol 2 (Python 2 era files: text through BINPUT, bytes through calls) and at
protocol 4 (today's default). Each figure is the worst shape's ratio, with every shape's beside it under raw:
`pickle_scan_ratio` = scan / `pickle.loads`, `safe_load_ratio` = `safe_pickle.loads` (scan + restricted load)
/ `pickle.loads`. Both sides run one after the other in this process on the same bytes. `limit_costs` loads,
each in a fresh process, a file just inside MAX_COMPARED and one just inside MAX_BYTES_BUILT.

    .venv/bin/python bench/bench_pickle.py      # 200,000 and 2,000,000 records, writes bench/pickle_scan.json
    .venv/bin/python bench/bench_pickle.py --records 20000 --out /tmp/p.json   # a quick look
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import median

from captioning import pickle_scan, safe_pickle
from captioning.files import write_json
from captioning.pickle_scan import MAX_COMPARED
from captioning.safe_pickle import MAX_BYTES_BUILT
from captioning.timing import Stopwatch

PROTOCOLS = (2, 4)
WORDS = "a black dog runs across the green grass while two children in red shirts watch it".split()


def flickr_records(n: int) -> tuple[list[str], list[str]]:
    """`n` (image, caption) records, five per image: Flickr8k's name pattern and caption length, every
    string its own object (as read from a file), so the pickle memoizes none of them."""
    images = [f"{1_000_000_000 + i // 5}_{(i // 5) * 2654435761 % 16**10:010x}.jpg" for i in range(n)]
    captions = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(11)) + " ." for i in range(n)]
    return images, captions


def shapes(n: int) -> dict:
    """The captions shapes most files have (README, Input formats), `n` records each."""
    images, captions = flickr_records(n)
    pairs = list(zip(images, captions, strict=True))
    return {
        "dict of lists": {images[i]: captions[i:i + 5] for i in range(0, n, 5)},
        "list of pairs": pairs,
        "list of dicts": [{"image": image, "caption": caption} for image, caption in pairs],
        "list of lines": [f"{image}#{i % 5}\t{caption}" for i, (image, caption) in enumerate(pairs)],
    }


def _timed(function, data: bytes) -> tuple[float, float]:
    gc.collect()  # the last side's garbage is not this side's cost
    with Stopwatch() as watch:
        function(data)
    return watch.seconds, watch.cpu_seconds


def measure(data: bytes, repeats: int) -> dict:
    """Wall and CPU seconds of each side, `repeats` times, the sides alternating."""
    sides = {"pickle_loads": pickle.loads, "scan": pickle_scan.check_nesting, "safe_loads": safe_pickle.loads}
    seconds: dict = {name: [] for name in sides}
    for _ in range(repeats):
        for name, function in sides.items():
            seconds[name].append(_timed(function, data))
    return seconds


def _ratio(seconds: dict, side: str, column: int) -> float:
    return median(s[column] / base[column] for s, base in zip(seconds[side], seconds["pickle_loads"], strict=True))


def _number(value: int) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # the opcode of one int, without PROTO and STOP


def compared_pickle(keys: int) -> bytes:
    """A dict of `keys` int keys that all hash to 0 (multiples of `sys.hash_info.modulus`): building it compares
    keys * (keys - 1) / 2 pairs, the work MAX_COMPARED bounds."""
    modulus = sys.hash_info.modulus
    return b"\x80\x02}(" + b"".join(_number(k * modulus) + b"N" for k in range(1, keys + 1)) + b"u."


def copies_pickle(text_bytes: int, copies: int) -> bytes:
    """A list of `copies` bytes objects, each `_codecs.encode` of one memoized text of `text_bytes` characters
    (how protocols 0-2 write bytes): the bytes MAX_BYTES_BUILT bounds, `text_bytes * copies` of them."""
    text = b"x" * text_bytes
    call = b"c_codecs\nencode\nh\x01h\x02\x86R"
    return (b"\x80\x02](X" + len(text).to_bytes(4, "little") + text + b"q\x01X\x06\x00\x00\x00latin1q\x02"
            + call * copies + b"e.")


# The child's peak RSS is VmHWM: ru_maxrss keeps the peak of the process it was forked from, this one.
_CHILD = """import json, sys, time
from captioning import safe_pickle
data = open(sys.argv[1], "rb").read()
started = time.process_time()
safe_pickle.loads(data)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"cpu_seconds": time.process_time() - started, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def load_in_child(workdir: Path, data: bytes) -> dict:
    """CPU seconds of `safe_pickle.loads(data)` and the peak RSS of a fresh process that ran it (so one file's
    memory is not hidden under another's); also the file's size."""
    path = workdir / "limit.pkl"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True)
    return {"file_mb": round(len(data) / 1e6, 2), **json.loads(done.stdout)}


def limit_costs(workdir: Path) -> dict:
    """What a file just inside MAX_COMPARED and MAX_BYTES_BUILT costs to load, beside an empty list's load (the
    start-up): the price of a bound is what the largest file it lets through costs."""
    keys = int((2 * MAX_COMPARED) ** 0.5)  # keys * (keys - 1) / 2 just under MAX_COMPARED
    text_bytes = 1_000_000
    return {"empty list": load_in_child(workdir, pickle.dumps([], protocol=2)),
            f"{keys:,} keys of one hash ({keys * (keys - 1) // 2:,} compared)": load_in_child(
                workdir, compared_pickle(keys)),
            f"one {text_bytes:,}-byte text copied {MAX_BYTES_BUILT // text_bytes:,} times": load_in_child(
                workdir, copies_pickle(text_bytes, MAX_BYTES_BUILT // text_bytes))}


def run(workdir: Path, records: int, repeats: int) -> dict:
    cases = {}
    for shape, obj in shapes(records).items():
        for protocol in PROTOCOLS:
            data = pickle.dumps(obj, protocol=protocol)
            seconds = measure(data, repeats)
            cases[f"{shape}, protocol {protocol}"] = {
                "megabytes": round(len(data) / 1e6, 1), "seconds": seconds,
                **{f"{side}_ratio": _ratio(seconds, side, 0) for side in ("scan", "safe_loads")},
                **{f"{side}_cpu_ratio": _ratio(seconds, side, 1) for side in ("scan", "safe_loads")}}
        del obj
    raw = {"records": records, "repeats": repeats, "seconds_are": "[wall, cpu] per repeat", "cases": cases}
    return {key: {"value": max(case[f"{side}_ratio"] for case in cases.values()),
                  "cpu_time_value": max(case[f"{side}_cpu_ratio"] for case in cases.values()), "raw": raw}
            for key, side in (("pickle_scan_ratio", "scan"), ("safe_load_ratio", "safe_loads"))}


def print_cases(records: int, figures: dict) -> None:
    print(f"{records:,} records (wall-clock ratio, CPU-time ratio in brackets):")
    for name, case in figures["pickle_scan_ratio"]["raw"]["cases"].items():
        scan, safe = (f"{case[f'{side}_ratio']:6.2f}x (cpu {case[f'{side}_cpu_ratio']:.2f}x)"
                      for side in ("scan", "safe_loads"))
        print(f"  {name:<28}{case['megabytes']:>7} MB  scan {scan}  safe load {safe}")


def main() -> None:
    """This benchmark alone, without TensorFlow: about 5 min for both sizes on 2 shared cores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "pickle_scan.json")
    args = parser.parse_args()
    report: dict = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "python": platform.python_version(), "cpus": os.cpu_count(), "records": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for records in args.records:
            report["records"][str(records)] = figures = run(Path(workdir), records, args.repeats)
            print_cases(records, figures)
        report["limits"] = limit_costs(Path(workdir))
    for name, cost in report["limits"].items():
        print(f"{name}: {cost['file_mb']} MB file, {cost['cpu_seconds']:.2f} s CPU, "
              f"peak RSS {cost['peak_rss_mb']:.0f} MB")
    write_json(args.out, report)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
