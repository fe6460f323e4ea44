"""Wall-clock timing shared by the stages and the benchmarks, so every reported second is measured alike."""
from __future__ import annotations

import time


class Stopwatch:
    """`with Stopwatch() as watch: ...` then `watch.seconds`; or `restart()` and read `elapsed` as it runs.

    perf_counter, not time.time: it is monotonic, so a clock adjustment mid-epoch cannot make a duration
    negative or wrong."""

    def __init__(self):
        self.restart()
        self.seconds = 0.0

    def restart(self) -> None:
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def __enter__(self) -> Stopwatch:
        self.restart()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = self.elapsed
