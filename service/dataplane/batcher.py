"""Dynamic batching: requests for one model queue up and run as micro-batches.

Like Triton's dynamic batcher: a worker takes the first queued image, waits up to
`max_delay_s` for more (never past `max_batch`), and runs them as one ONNX Runtime call
in the thread pool. The queue is bounded: a full queue answers `Overloaded` at once
(RESOURCE_EXHAUSTED / HTTP 429) instead of growing. Requests whose deadline passed
while queued are dropped before inference. Decoding happens before `submit`, in the
pool, so it overlaps with inference of earlier batches.

With batching off (`max_batch == 1`, the CPU default) `submit_unbatched` skips the queue
task: one thread-pool call decodes, checks the deadline and runs the model, so a request
costs one hand-off between the event loop and the pool instead of two, and no copy into a
batch. The same bound applies to the requests waiting for a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service import metrics
from service.errors import DeadlineExceeded, Overloaded
from service.runtime.engine import OnnxModel, finite

__all__ = ["BatchResult", "Batcher", "DeadlineExceeded", "collect"]

log = logging.getLogger(__name__)
T = TypeVar("T")


async def collect(queue: asyncio.Queue[T], max_items: int, max_delay_s: float) -> list[T]:
    """Wait for one item, then take more for up to `max_delay_s` (never over `max_items`):
    the micro-batching step, shared by the batcher and the inspection log's writer."""
    items = [await queue.get()]
    end = time.monotonic() + max_delay_s
    while len(items) < max_items:
        try:
            items.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = end - time.monotonic()
        if remaining <= 0:
            break
        try:
            items.append(await asyncio.wait_for(queue.get(), remaining))
        except asyncio.TimeoutError:
            break
    return items


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float
    deadline: float | None


@dataclass
class BatchResult:
    """One image's share of a batch run."""

    score: float
    amap: np.ndarray
    queue_s: float
    inference_s: float
    batch_size: int
    finite: bool = True  # score and every map value finite (checked in the worker thread)


class Batcher:
    """Micro-batching queue in front of one `OnnxModel`.

    Args:
        model: the model to run.
        run: coroutine function that runs a callable in the inference thread pool.
        max_batch: largest batch (1 disables batching).
        max_delay_s: how long the first request of a batch waits for company.
        max_queue: bound of the queue.
        workers: concurrent batch loops (more than one when batching is off).
        label: model label for metrics.
        alone: given the images of a call, whether they are all the requests in flight
            (the model then may run them on all cores: adaptive execution in `service.runtime.engine`).
    """

    def __init__(self, model: OnnxModel, run: Callable[..., Awaitable], *, max_batch: int,
                 max_delay_s: float, max_queue: int, workers: int = 1, label: str = "",
                 alone: Callable[[int], bool] = lambda _: True) -> None:
        self.model = model
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self.label = label
        self.alone = alone
        self._tasks = ([asyncio.create_task(self._loop()) for _ in range(workers)]
                       if max_batch > 1 else [])
        self._busy = 0
        self._unbatched = 0  # submitted through `submit_unbatched`, not finished
        self._waiting = 0  # of those, not yet started on a thread
        self._lock = threading.Lock()

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run a batch (in a pool thread) and check every output for NaN/inf there too."""
        scores, maps = self.model.infer(batch, self.alone(len(batch)))
        return scores, maps, finite(scores, maps)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return self.queue.empty() and self._busy == 0 and self._unbatched == 0

    async def submit_unbatched(self, prepare: Callable[[], tuple], deadline: float | None = None,
                               ) -> tuple[BatchResult, tuple]:
        """Batching off: in one pool call, `prepare()` → `(x, *extra)`, then run `x` alone.

        Returns:
            The result and `extra` (what `prepare` returned besides the input).

        Raises:
            Overloaded: `max_queue` requests are already waiting for a thread.
            DeadlineExceeded: the deadline passed before a thread took the request.
        """
        with self._lock:
            if self._waiting >= self.queue.maxsize:
                raise Overloaded(f"inference queue full ({self._waiting} images waiting); retry later")
            self._waiting += 1
        enqueued = time.monotonic()
        claimed = [False]  # left the waiting count: by a thread starting it, or by cancellation

        def leave_queue() -> bool:
            with self._lock:
                if claimed[0]:
                    return False
                claimed[0] = True
                self._waiting -= 1
                return True

        def work() -> tuple[BatchResult, tuple]:
            started = time.monotonic()
            if not leave_queue():  # the caller went away while it waited
                raise asyncio.CancelledError()
            if deadline is not None and started >= deadline:
                raise DeadlineExceeded(f"deadline passed after {1e3 * (started - enqueued):.0f} ms "
                                       "in the queue")
            x, *extra = prepare()
            t0 = time.perf_counter()
            scores, maps, ok = self._infer(x[None])
            result = BatchResult(float(scores[0]), maps[0], started - enqueued,
                                 time.perf_counter() - t0, 1, bool(ok[0]))
            return result, tuple(extra)

        self._unbatched += 1
        try:
            out = await self._run(work)
        finally:
            self._unbatched -= 1
            leave_queue()  # no-op unless the call was cancelled before a thread took it
        metrics.BATCH_SIZE.observe(1)
        return out

    async def submit(self, x: np.ndarray, deadline: float | None = None) -> BatchResult:
        """Queue one preprocessed image `(3, H, W)` and wait for its result.

        Raises:
            Overloaded: the queue is full.
            DeadlineExceeded: the deadline (monotonic time) passed while queued.
        """
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Item(x, fut, time.monotonic(), deadline))
        except asyncio.QueueFull:
            raise Overloaded(f"inference queue full ({self.queue.maxsize} images waiting); "
                             "retry later") from None
        metrics.QUEUE_DEPTH.labels(self.label).set(self.queue.qsize())
        return await fut

    async def _loop(self) -> None:
        while True:
            items = await collect(self.queue, self.max_batch, self.max_delay_s)
            self._busy += 1
            try:
                await self._run_batch(items)
            except Exception as exc:  # never let the loop die; fail this batch's requests
                log.exception("batch of %d failed", len(items))
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
            finally:
                self._busy -= 1
                metrics.QUEUE_DEPTH.labels(self.label).set(self.queue.qsize())

    async def _run_batch(self, items: list[_Item]) -> None:
        now = time.monotonic()
        live = []
        for it in items:
            if it.future.done():  # cancelled by the client
                continue
            if it.deadline is not None and now >= it.deadline:
                it.future.set_exception(DeadlineExceeded(
                    f"deadline passed after {1e3 * (now - it.enqueued):.0f} ms in the queue"))
                continue
            live.append(it)
        if not live:
            return
        batch = np.stack([it.x for it in live])
        t0 = time.perf_counter()
        scores, maps, ok = await self._run(self._infer, batch)
        inference_s = time.perf_counter() - t0
        metrics.BATCH_SIZE.observe(len(live))
        for i, it in enumerate(live):
            if not it.future.done():
                it.future.set_result(BatchResult(float(scores[i]), maps[i], now - it.enqueued,
                                                 inference_s, len(live), bool(ok[i])))

    async def close(self, timeout: float = 5.0) -> None:
        """Let queued work finish (up to `timeout`), then stop the workers."""
        deadline = time.monotonic() + timeout
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
