"""Work off the event loop: a micro-batcher for inference and a bounded single-thread queue for activation maps."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
logger = logging.getLogger(__name__)
_STOP = object()


class MicroBatcher:
    """One inference thread that stacks the slices of concurrent requests into batches.

    The thread takes the first waiting slice, then whatever else arrives within ``max_wait_s`` up to ``max_batch``
    slices, runs ``forward`` once on the stack and hands each request its row. Under load the batches fill while
    the previous one runs, so throughput grows with concurrency instead of queueing one forward pass per request.
    """

    def __init__(
        self, forward: Callable[[np.ndarray], np.ndarray], *, max_batch: int = 32, max_wait_s: float = 0.002
    ) -> None:
        self._forward = forward
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="brainscan-batcher", daemon=True)
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the most recent batches' sizes
        self._thread.start()

    async def submit(self, item: np.ndarray) -> np.ndarray:
        """``forward``'s row for one item, computed in a batch with whatever else is waiting."""
        future: Future[np.ndarray] = Future()
        self._queue.put((item, future))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Finish the batches already queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[tuple[np.ndarray, Future[np.ndarray]]]) -> None:
        live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes.append(len(live))
        try:
            rows = self._forward(np.stack([item for item, _ in live]))
        except Exception as exc:  # every request of the batch gets the error; the thread goes on
            logger.exception("Inference failed on a batch of %d", len(live))
            for _, future in live:
                future.set_exception(exc)
            return
        for row, (_, future) in zip(rows, live, strict=True):
            future.set_result(row)


class QueueFull(Exception):
    """The bounded queue has no free place; retry later."""


class BoundedExecutor:
    """One worker thread with at most ``waiting`` jobs queued behind the running one; beyond that,
    :meth:`submit` refuses at once (:class:`QueueFull`) instead of letting the backlog and its latency grow."""

    def __init__(self, waiting: int, *, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.capacity = 1 + max(0, int(waiting))
        self._taken = 0
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        """Whether :meth:`submit` would refuse now (a hint: another request may take or free a place)."""
        return self._taken >= self.capacity

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the worker thread.

        Raises:
            QueueFull: the running job and ``waiting`` queued ones fill every place.
        """
        with self._lock:
            if self._taken >= self.capacity:
                raise QueueFull
            self._taken += 1
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._lock:
            self._taken -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
