"""What the pickle pre-scan costs: bounded work per record, bounded memory, and no work for the garbage collector.

The shapes are those of bench/bench_pickle.py (one source), smaller; the bench gives the figures."""
from __future__ import annotations

import gc
import pickle
import sys
import tracemalloc

import pytest

from captioning import pickle_scan
from captioning.tiny_project import PROJECT

sys.path.insert(0, str(PROJECT / "bench"))  # the benchmarks import their siblings as top-level modules
import bench_pickle  # noqa: E402

RECORDS = 50_000


def calls_per_record(function, data: bytes, records: int) -> float:
    """Python and C function calls made per record: the scan's work, counted exactly, not timed (a test on
    shared cores must not assert a timing; bench/bench_pickle.py times it against pickle.loads)."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        function(data)
    finally:
        sys.setprofile(None)
    return calls / records


# (image, caption) pairs and {image, caption} dicts, the slowest shapes to scan, cost 35 and 41 calls a record
# before the fast paths for text-only tuples and fills and the inline memo reads (12 and 30 after); that work,
# with the garbage collector's (next test), made the scan 17-23x the CPU time of C pickle.loads, now 8-10x.
@pytest.mark.parametrize(("shape", "most"), [("list of pairs", 20), ("list of dicts", 36)])
def test_the_scan_does_a_bounded_work_per_record(shape, most):
    records = 5_000
    data = pickle.dumps(bench_pickle.shapes(records)[shape], protocol=4)
    assert calls_per_record(pickle_scan.check_nesting, data, records) < most


def test_the_scan_leaves_the_garbage_collector_idle_and_as_it_found_it():
    """The scan's millions of small nodes made the collector walk them over and over (a third of its time);
    they hold no cycles, so it pauses the collector, and restores it even when it refuses a file."""
    data = pickle.dumps(bench_pickle.shapes(RECORDS)["list of pairs"], protocol=4)
    passes: list = []

    def count(phase, info):
        passes.append(phase)

    gc.callbacks.append(count)
    try:
        pickle_scan.check_nesting(data)
    finally:
        gc.callbacks.remove(count)
    assert passes == [] and gc.isenabled()
    with pytest.raises(pickle.UnpicklingError):
        pickle_scan.check_nesting(data[:-1])  # no STOP
    assert gc.isenabled()
    gc.disable()
    try:
        pickle_scan.check_nesting(data)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


@pytest.mark.parametrize("shape", ["dict of lists", "list of pairs", "list of dicts", "list of lines"])
def test_the_scan_needs_no_more_memory_than_the_objects_it_checks(shape):
    """The scan kept a 6-item tuple for every text and a dict entry with an int key for every memo index:
    1.5-2.3x the memory of the unpickled objects (1.6 GB for 2,000,000 pairs), so it, not the unpickling, set
    the peak of `parse_pickle`. Peak bytes allocated (tracemalloc counts them exactly)."""
    data = pickle.dumps(bench_pickle.shapes(RECORDS // 5)[shape], protocol=4)

    def peak(function) -> int:
        tracemalloc.start()
        try:
            function(data)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(pickle_scan.check_nesting) < 1.3 * peak(pickle.loads)
