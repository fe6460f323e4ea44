"""Dynamic batching, as Triton and TF Serving do it: requests that arrive together share one pass.

Each image waits in an asyncio queue; a single loop takes the first waiting image, gathers more for
at most `max_wait_s` (or until `max_batch` images), and hands the whole batch to one worker thread,
so the event loop keeps accepting requests while TensorFlow runs, and TensorFlow never runs two
batches at once (two would only fight over the same cores). Images that queue up during a pass form
the next batch, so under load batches fill by themselves and the wait hardly matters.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# run_batch(items, settings per item) -> one result per item, in order; one call per batch. A result that is
# an exception fails that item's request only (say, one request's settings the model cannot decode with).
BatchFunction = Callable[[Sequence[Any], Sequence[dict]], Sequence[Any]]


class DynamicBatcher:
    def __init__(self, run_batch: BatchFunction, max_batch: int = 16, max_wait_s: float = 0.005):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self.batches = 0  # passes run so far, and the images they held: shown by /health
        self.items = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorflow")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._worker.shutdown(wait=True)

    async def submit(self, item: Any, settings: dict) -> Any:
        """The result for one item, computed in a batch with whatever else arrives meanwhile."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, settings, future))
        return await future

    async def run_in_worker(self, function: Callable, *args) -> Any:
        """Run other TensorFlow work (warm-up) on the same single worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    async def _gather(self) -> list:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _serve(self) -> None:
        while True:
            batch = await self._gather()
            batch = [entry for entry in batch if not entry[2].done()]  # a client that left needs no pass
            if not batch:
                continue
            try:
                results = await self.run_in_worker(self.run_batch, [e[0] for e in batch], [e[1] for e in batch])
            except Exception as err:  # noqa: BLE001 - handed to each waiting request, which answers it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def allowed_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The few batch sizes a pass runs at (TF Serving's `allowed_batch_sizes`): powers of two from 2,
    then `max_batch`. TensorFlow and oneDNN keep kernels and buffers for every input shape they meet,
    so a server fed each size from 1 to 16 grows by ~200 MB as it meets them; padded to these
    sizes, and each met once at start, it stays flat. 1 is left out: a batch of one takes other
    kernels than evaluate's batches (see features.FeatureComputer.forward)."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    sizes = {max(max_batch, 2)}
    size = 2
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def padded_size(n: int, sizes: Sequence[int]) -> int:
    """The smallest allowed size that holds n rows; n itself when n is over them all."""
    return next((size for size in sizes if size >= n), n)
