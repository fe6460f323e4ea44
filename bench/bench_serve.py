"""The captioning server under load: the real `python -m captioning serve` on loopback, driven over HTTP.

Against a baseline measured in the same run on the same images and model: offline extraction
(compute_features, as the pipeline runs it) plus one batched decode with the same settings.
  lone latency   one request at a time, each one image: p50 and p99 in ms
  throughput     16 concurrent clients, one image per request: images/s, as a ratio to offline
  errors         requests that did not answer 200 (or got no answer), over the whole run
  rss growth     the server's peak RSS after all requests vs after the first 100. The JSON also has the peak
                 and the current RSS after the bursts and after each tenth of the rest: a leak raises both
                 steadily, while a one-off spike raises only the peak.
The model is an untrained decoder with the pipeline's sizes (params.yaml's train section) and the
seeded random backbone: decoding always runs all max_length steps, so speed does not depend on training.
"""
from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench_train import decoder_data, new_decoder
from common import PARAMS, ROOT, demo_data, median

from captioning.bundle import save_decode_settings
from captioning.consensus import NgramStatistics
from captioning.features import compute_features
from captioning.neighbours import NeighbourIndex
from captioning.params import TrainConfig
from captioning.timing import Stopwatch
from captioning.train import save_bundle

CLIENTS = 16
RSS_STEPS = 10  # RSS readings over the requests after the bursts


def write_bundle(workdir: Path, n_images: int) -> Path:
    """A model folder written by train_lstm's own `save_bundle` (an untrained decoder on random features),
    and the decode settings evaluate would save for it (params.yaml's), in workdir/decode.json."""
    table, store, vocab, data = decoder_data(workdir / "decoder", n_images)
    model_dir = workdir / "model"
    save_bundle(new_decoder(vocab, store, data), vocab, store, TrainConfig(**PARAMS["train"]), model_dir,
                NgramStatistics.from_table(table), NeighbourIndex.from_table(table, store))
    save_decode_settings(workdir / "decode.json", model_dir, PARAMS["decode"])
    return model_dir


def memory_kb(pid: int) -> tuple[int, int]:
    """A process's peak RSS (VmHWM: the highest so far) and its RSS now (VmRSS), in kB, from one read."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak, now = (int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) for field in ("VmHWM", "VmRSS"))
    return peak, now


class Load:
    """Requests to the server, each one image, counting every answer that is not a 200."""

    def __init__(self, address: str, images: list[bytes]):
        import httpx

        self.client = httpx.Client(base_url=address, timeout=120, limits=httpx.Limits(max_connections=CLIENTS))
        self.images, self.sent, self.errors = images, 0, 0

    def one(self, n: int) -> float:
        import httpx

        with Stopwatch() as watch:
            try:
                answer = self.client.post("/caption", files={"image": (f"{n}.jpg", self.images[n % len(self.images)])})
                ok = answer.status_code == 200
            # No answer at all (a reset connection, a timeout) is a failed request too: it is counted in
            # serve_errors, where it used to end the whole benchmark with a traceback.
            except httpx.HTTPError:
                ok = False
        self.sent += 1
        self.errors += not ok
        return watch.seconds

    def concurrent(self, count: int) -> float:
        """Seconds for `count` requests from CLIENTS clients at once."""
        with Stopwatch() as watch, ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(self.one, range(count)))
        return watch.seconds


def start_server(model_dir: Path, decode_json: Path) -> tuple[subprocess.Popen, str]:
    """`python -m captioning serve` on any free port, and its address once it has loaded the model."""
    server = subprocess.Popen([sys.executable, "-m", "captioning", "serve", "--port", "0", "--model", str(model_dir),
                               "--decode-settings", str(decode_json), "--max-batch", str(CLIENTS)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()  # the address line, or "" when it stopped (its error went to stderr)
    found = re.search(r"http://[\d.]+:\d+", line)
    if not found:  # say so, rather than "'NoneType' object has no attribute 'group'" in results.json
        server.terminate()
        status = server.wait(timeout=60)
        raise RuntimeError(f"the server did not start (exit status {status}, its error is on stderr above; "
                           f"it printed {line.strip()!r})")
    return server, found.group(0)


def offline_rate(model_dir: Path, paths: list[str], repeats: int) -> list[float]:
    """Images/s of extraction plus decoding, as evaluate does them, in this process."""
    from captioning.bundle import decode_settings
    from captioning.inference import LoadedCaptioner

    loaded = LoadedCaptioner(model_dir, decode_settings(model_dir, model_dir.parent / "decode.json"))
    out = np.zeros((len(paths), loaded.backbone.output_shape[-1]), np.float32)
    batch_size = PARAMS["features"]["batch_size"]
    rates = []
    for repeat in range(repeats + 1):  # the first run traces the functions and is left out
        with Stopwatch() as watch:
            compute_features(loaded.backbone, paths, loaded.image_size, batch_size, out, progress=False)
            loaded.captioner.caption_ids(out, **loaded.settings)
        if repeat:
            rates.append(len(paths) / watch.seconds)
    return rates


def run(workdir: Path, n_images: int, lone: int, burst: int, rss_early: int, rss_total: int,
        repeats: int = 3) -> dict:
    model_dir = write_bundle(workdir, n_images)
    table, images_dir = demo_data(workdir / "demo", n_images)
    paths = [str(images_dir / name) for name in sorted(table["image"].unique())]
    jpegs = [Path(path).read_bytes() for path in paths]
    server, address = start_server(model_dir, workdir / "decode.json")
    try:
        load = Load(address, jpegs)
        lone_ms = sorted(1000 * load.one(n) for n in range(lone))
        load.concurrent(max(rss_early - load.sent, 0))

        def reading() -> tuple[int, int, int]:  # requests so far, peak and current RSS in kB
            return (load.sent, *memory_kb(server.pid))

        rss_curve = [reading()]
        server_rates = [burst / load.concurrent(burst) for _ in range(repeats)]
        rss_curve.append(reading())
        after_bursts = load.sent
        for step in range(1, RSS_STEPS + 1):
            load.concurrent(max(after_bursts + (rss_total - after_bursts) * step // RSS_STEPS - load.sent, 0))
            rss_curve.append(reading())
        sent, errors = load.sent, load.errors
    finally:
        server.terminate()
        server.wait(timeout=60)
    rss_after_early, rss_after_all = rss_curve[0][1], rss_curve[-1][1]
    offline = offline_rate(model_dir, paths, repeats)
    ratio = median(server_rates) / median(offline)
    return {
        "serve_throughput_ratio": {
            "value": round(ratio, 3), "clients": CLIENTS, "server_images_per_s": round(median(server_rates), 2),
            "offline_images_per_s": round(median(offline), 2),
            "lone_p50_ms": round(float(np.percentile(lone_ms, 50)), 1),
            "lone_p99_ms": round(float(np.percentile(lone_ms, 99)), 1),
            "raw": {"server": [round(r, 2) for r in server_rates], "offline": [round(r, 2) for r in offline],
                    "lone_ms": [round(ms, 1) for ms in lone_ms]}},
        "serve_errors": {"value": errors, "requests": sent},
        "serve_rss_growth": {"value": round(rss_after_all / rss_after_early, 3), "requests_early": rss_early,
                             "requests_total": sent, "peak_rss_mb_early": round(rss_after_early / 1024, 1),
                             "peak_rss_mb_total": round(rss_after_all / 1024, 1),
                             "raw": {"requests_peak_and_current_rss_mb": [
                                 [requests, round(peak / 1024, 1), round(now / 1024, 1)]
                                 for requests, peak, now in rss_curve]}},
    }


if __name__ == "__main__":  # a quick standalone check; bench/run.py runs it with the sizes of its mode
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(run(Path(folder), n_images=32, lone=20, burst=48, rss_early=100, rss_total=300,
                             repeats=2), indent=2))
