"""`MicroBatcher`: coalesce concurrent requests into engine batches, off the event loop.

Why: an engine call has a large fixed cost (shared-prefix forward, padding, kernel launches),
so ten one-item requests judged as one ten-item batch finish several times sooner than ten
separate calls. Trainers and labeling jobs send many small concurrent requests; the batcher
turns them into the large batches the engine is good at.

How:
- `submit(key, items)` appends the request to a FIFO and awaits a future. Requests only
  share a batch when their key matches (the service uses `(kind, rubric, mode)`), because a
  batch runs through one judge.
- One dispatcher task takes the oldest request, waits at most `max_wait_s` (counted from
  that request's arrival, or from the end of the previous batch if that is later: the
  clients it just answered are about to send their next request) for more requests with
  the same key, then takes FIFO requests of
  that key up to `max_batch_size` items (a request is never split; a larger one runs alone).
- The batch runs in a single worker thread, so the event loop keeps accepting requests
  (which become the next batch) while the engine computes; one thread because the engine
  serializes calls anyway.
- Results are sliced back to each request in order. A request whose future is already done
  (timed out, client gone) is skipped, never judged.
- Back-pressure: at most `max_queue` items wait; beyond that `submit` raises `QueueFull`
  (HTTP 429 + Retry-After) instead of growing an unbounded backlog.
- Failure isolation: when a batch of several requests raises, each request is re-run alone
  once, so one poisoned input fails only its own request (`EngineFailed`, HTTP 503) and an
  unrelated request that happened to share its batch still gets its answer.
- `stop()` refuses new work and finishes what is queued and in flight (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.errors import EngineFailed, NotReady, QueueFull, RequestTimeout

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]
"""`run_batch(key, items) -> results`, one result per item; runs in the worker thread."""

BatchObserver = Callable[[Hashable, int, int, float, bool], None]
"""`on_batch(key, items, requests, seconds, failed)`, called on the event loop after each engine batch."""


@dataclass(eq=False)
class _Entry:
    key: Hashable
    items: list[Any]
    future: asyncio.Future[list[Any]]
    enqueued: float
    taken: bool = field(default=False)


class MicroBatcher(Generic[ItemT, ResultT]):
    """See the module docstring. Create, `await start()`, `submit(...)` many times, `await stop()`."""

    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_wait_s: float, max_queue: int,
                 retry_after: float = 1.0, on_batch: BatchObserver | None = None,
                 on_queue_depth: Callable[[int], None] | None = None) -> None:
        assert max_batch_size >= 1 and max_queue >= 1 and max_wait_s >= 0, "batcher limits must be positive"
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._pending: collections.deque[_Entry] = collections.deque()
        self._pending_items = 0
        self._key_items: collections.Counter[Hashable] = collections.Counter()  # queued items per key
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._last_batch_end = float("-inf")  # loop time when the last engine batch returned

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is not None:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlaif-engine")
        self._closing = False
        self._task = asyncio.create_task(self._dispatch_forever(), name="rlaif-micro-batcher")

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish queued and running batches (up to `timeout` s), then stop."""
        if self._task is None:
            return
        self._closing = True
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            logger.warning("micro-batcher did not drain within %.1fs; failing %d queued requests", timeout, len(self._pending))
            self._task.cancel()
            for entry in self._pending:
                entry.taken = True
                if not entry.future.done():
                    entry.future.set_exception(NotReady("the service is shutting down"))
            self._pending.clear()
            self._key_items.clear()
            self._set_pending_items(0)
        self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def queue_depth(self) -> int:
        """Items waiting for the engine (not counting the batch in flight)."""
        return self._pending_items

    # ------------------------------------------------------------------ requests
    async def submit(self, key: Hashable, items: Sequence[ItemT], timeout: float | None = None) -> list[ResultT]:
        """Queue `items` under `key`; return their results in order.

        Raises `QueueFull` (queue at capacity), `RequestTimeout` (no result within `timeout` s),
        `EngineFailed` (the engine raised on this request), `NotReady` (batcher stopped).
        """
        if self._task is None or self._closing:
            raise NotReady("the service is shutting down", retry_after=self.retry_after)
        if not items:
            return []
        if self._pending_items + len(items) > self.max_queue:
            raise QueueFull(f"the judge queue is full ({self._pending_items} items waiting, max_queue={self.max_queue}); "
                            f"retry after {self.retry_after:g}s", retry_after=self.retry_after)
        loop = asyncio.get_running_loop()
        entry = _Entry(key=key, items=list(items), future=loop.create_future(), enqueued=loop.time())
        self._enqueue(entry)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await asyncio.wait_for(entry.future, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no result within request_timeout={timeout:g}s; the judge is overloaded or the "
                                 "request is too large") from None
        finally:
            if not entry.taken:  # timed out or cancelled while queued: free its queue slots now
                self._dequeue(entry)

    # ------------------------------------------------------------------ dispatcher
    async def _dispatch_forever(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._pending[0]
            # Wait for joiners until max_wait after the head arrived *or* after the last batch ended:
            # the clients that batch just answered resubmit within milliseconds, and without the
            # second clause a closed loop of N clients settles into alternating half-size batches.
            deadline = max(head.enqueued, self._last_batch_end) + self.max_wait_s
            # Give same-key requests until the head's deadline to join, unless the batch is already full.
            while not self._closing and self._queued_items(head.key) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(head.key)
            if batch:
                try:
                    await self._execute(head.key, batch, isolate=len(batch) > 1)
                    self._last_batch_end = loop.time()
                except Exception:  # never let one bad batch kill the dispatcher
                    logger.exception("micro-batcher: unexpected error while executing a batch")
                    for entry in batch:
                        if not entry.future.done():
                            entry.future.set_exception(EngineFailed("internal error while judging this batch"))

    def _queued_items(self, key: Hashable) -> int:
        return self._key_items[key]

    def _enqueue(self, entry: _Entry) -> None:
        self._pending.append(entry)
        self._key_items[entry.key] += len(entry.items)
        self._set_pending_items(self._pending_items + len(entry.items))

    def _dequeue(self, entry: _Entry) -> None:
        self._pending.remove(entry)
        self._key_items[entry.key] -= len(entry.items)
        if not self._key_items[entry.key]:
            del self._key_items[entry.key]
        self._set_pending_items(self._pending_items - len(entry.items))

    def _take(self, key: Hashable) -> list[_Entry]:
        """Remove FIFO entries of `key` up to `max_batch_size` items (at least one entry)."""
        batch: list[_Entry] = []
        size = 0
        for entry in list(self._pending):
            if entry.key != key:
                continue
            if batch and size + len(entry.items) > self.max_batch_size:
                break
            self._dequeue(entry)
            entry.taken = True
            if entry.future.done():  # cancelled while waiting: never judge it
                continue
            batch.append(entry)
            size += len(entry.items)
        return batch

    async def _execute(self, key: Hashable, batch: list[_Entry], *, isolate: bool) -> None:
        loop = asyncio.get_running_loop()
        items = [item for entry in batch for item in entry.items]
        assert self._executor is not None
        started = time.perf_counter()
        try:
            results = list(await loop.run_in_executor(self._executor, self._run_batch, key, items))
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            self._observe(key, len(items), len(batch), time.perf_counter() - started, failed=True)
            if isolate:
                logger.warning("engine batch of %d requests failed (%s); re-running each request alone",
                               len(batch), type(exc).__name__)
                for entry in batch:
                    if not entry.future.done():
                        await self._execute(key, [entry], isolate=False)
                return
            logger.error("engine failed on a request of %d items: %s: %s", len(items), type(exc).__name__, exc)
            message = f"the engine failed on this request ({type(exc).__name__}: {exc})"
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(EngineFailed(message[:500]))
            return
        self._observe(key, len(items), len(batch), time.perf_counter() - started, failed=False)
        offset = 0
        for entry in batch:
            count = len(entry.items)
            if not entry.future.done():
                entry.future.set_result(results[offset:offset + count])
            offset += count

    def _observe(self, key: Hashable, items: int, requests: int, seconds: float, *, failed: bool) -> None:
        if self._on_batch is not None:
            self._on_batch(key, items, requests, seconds, failed)

    def _set_pending_items(self, value: int) -> None:
        self._pending_items = value
        if self._on_queue_depth is not None:
            self._on_queue_depth(value)
