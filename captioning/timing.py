"""Timing shared by the stages and the benchmarks, so every reported second is measured alike."""
from __future__ import annotations

import time


class Stopwatch:
    """`with Stopwatch() as watch: ...` then `watch.seconds`; or `restart()` and read `elapsed` as it runs.
    The `cpu_` twins count the CPU seconds of the whole process (all threads), which the benchmarks report
    next to wall clock because other jobs on shared cores hardly change them.

    perf_counter, not time.time: it is monotonic, so a clock adjustment mid-epoch cannot make a duration
    negative or wrong."""

    def __init__(self):
        self.restart()
        self.seconds = self.cpu_seconds = 0.0

    def restart(self) -> None:
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def cpu_elapsed(self) -> float:
        return time.process_time() - self.cpu_started

    def __enter__(self) -> Stopwatch:
        self.restart()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds, self.cpu_seconds = self.elapsed, self.cpu_elapsed
