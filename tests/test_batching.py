"""The dynamic batcher on its own (no TensorFlow): what arrives together shares one call."""
from __future__ import annotations

import asyncio
import threading

import pytest

from captioning.batching import DynamicBatcher, allowed_batch_sizes, padded_size


class Recorder:
    def __init__(self, fail: bool = False):
        self.calls, self.threads, self.fail = [], set(), fail

    def __call__(self, items, settings):
        self.calls.append(list(items))
        self.threads.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("model broke")
        return [(item * 10, options["beam"]) for item, options in zip(items, settings, strict=True)]


def run_burst(recorder, n: int, max_batch: int, max_wait_s: float):
    async def main():
        batcher = DynamicBatcher(recorder, max_batch=max_batch, max_wait_s=max_wait_s)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i, {"beam": i % 2}) for i in range(n)),
                                        return_exceptions=True), batcher
        finally:
            await batcher.stop()
    return asyncio.run(main())


def test_a_burst_is_one_call_and_each_caller_gets_its_own_result():
    recorder = Recorder()
    results, batcher = run_burst(recorder, 10, max_batch=16, max_wait_s=0.05)
    assert results == [(i * 10, i % 2) for i in range(10)]
    assert recorder.calls == [list(range(10))]
    assert (batcher.batches, batcher.items) == (1, 10)
    assert threading.get_ident() not in recorder.threads  # the work ran off the event loop's thread


def test_batches_never_exceed_the_maximum():
    recorder = Recorder()
    results, _ = run_burst(recorder, 10, max_batch=4, max_wait_s=0.05)
    assert [len(call) for call in recorder.calls] == [4, 4, 2]
    assert sorted(item for call in recorder.calls for item in call) == list(range(10))
    assert len(recorder.threads) == 1  # one worker thread: batches never run at once


def test_a_failing_batch_fails_each_of_its_callers():
    recorder = Recorder(fail=True)
    results, _ = run_burst(recorder, 3, max_batch=8, max_wait_s=0.05)
    assert all(isinstance(result, RuntimeError) for result in results)


def test_an_item_that_fails_fails_only_its_own_caller():
    def run_batch(items, settings):
        return [ValueError(f"item {item} cannot") if options["beam"] else item * 10
                for item, options in zip(items, settings, strict=True)]

    results, batcher = run_burst(run_batch, 4, max_batch=8, max_wait_s=0.05)
    assert results[0::2] == [0, 20]
    assert [str(result) for result in results[1::2]] == ["item 1 cannot", "item 3 cannot"]
    assert batcher.batches == 1


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch=0)


def test_allowed_batch_sizes_are_powers_of_two_then_the_maximum():
    assert allowed_batch_sizes(16) == (2, 4, 8, 16)
    assert allowed_batch_sizes(12) == (2, 4, 8, 12)
    assert allowed_batch_sizes(1) == (2,)  # never 1: a lone image takes other kernels
    assert [padded_size(n, (2, 4, 8, 16)) for n in (1, 2, 3, 5, 9, 16, 40)] == [2, 2, 4, 8, 16, 16, 40]
    with pytest.raises(ValueError):
        allowed_batch_sizes(0)
