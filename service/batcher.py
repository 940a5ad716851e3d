"""`MicroBatcher`: coalesce concurrent requests into engine batches, off the event loop.

Why: an engine call has a large fixed cost (shared-prefix forward, padding, kernel launches),
so ten one-item requests judged as one ten-item batch finish several times sooner than ten
separate calls. Trainers and labeling jobs send many small concurrent requests; the batcher
turns them into the large batches the engine is good at.

How:
- `submit(key, items, costs=...)` appends the request to a FIFO and awaits a future. Requests
  only share a batch when their key matches (the service uses `(kind, rubric, mode)`), because
  a batch runs through one judge.
- One dispatcher task takes the oldest request, waits at most `max_wait_s` (counted from
  that request's arrival, or from the end of the previous batch if that is later: the
  clients it just answered are about to send their next request) for more requests with
  the same key, then takes FIFO items of that key until the batch holds `max_batch_size`
  items or the next item would push it past `max_batch_tokens` (each item's `cost`, its token
  count). A request larger than that is **split** across consecutive batches (its results are
  reassembled in order), so no batch ever exceeds either cap and a large request cannot hold
  the engine for minutes in one call; a batch always holds at least one item.
- The batch runs in a single worker thread, so the event loop keeps accepting requests
  (which become the next batch) while the engine computes; one thread because the engine
  serializes calls anyway.
- A request whose future is done (timed out, cancelled because its client disconnected,
  failed) leaves the queue at once: its waiting items are never judged.
- Back-pressure: at most `max_queue` items wait; beyond that `submit` raises `QueueFull`
  (HTTP 429 + Retry-After) instead of growing an unbounded backlog, unless the caller asks
  to wait for room (`wait_for_room=True`, bounded by its timeout).
- Failure isolation: when a batch holding parts of several requests raises, each part is
  re-run alone once, so one poisoned input fails only its own request (`EngineFailed`, HTTP
  503) and an unrelated request that happened to share its batch still gets its answer.
- `stop()` refuses new work and finishes what is queued and in flight (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rlaif.service.errors import EngineFailed, NotReady, QueueFull, RequestTimeout

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]
"""`run_batch(key, items) -> results`, one result per item; runs in the worker thread."""

BatchObserver = Callable[[Hashable, int, int, float, bool], None]
"""`on_batch(key, items, requests, seconds, failed)`, called on the event loop after each engine batch."""


@dataclass(eq=False)
class _Entry:
    """One submitted request; its items are handed to the engine front to back, possibly in several batches."""

    key: Hashable
    items: list[Any]
    costs: list[float]
    future: asyncio.Future[list[Any]]
    enqueued: float
    results: list[Any] = field(default_factory=list)
    dispatched: int = 0  # items[:dispatched] have been handed to the engine
    finished: int = 0  # items with a result
    queued: bool = True  # still in the pending FIFO (some items wait)

    @property
    def waiting(self) -> int:
        return len(self.items) - self.dispatched


@dataclass(frozen=True)
class _Part:
    """items[start:stop] of one request, inside one engine batch."""

    entry: _Entry
    start: int
    stop: int


class MicroBatcher(Generic[ItemT, ResultT]):
    """See the module docstring. Create, `await start()`, `submit(...)` many times, `await stop()`."""

    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_wait_s: float, max_queue: int,
                 max_batch_tokens: float | None = None, retry_after: float = 1.0,
                 on_batch: BatchObserver | None = None, on_queue_depth: Callable[[int], None] | None = None) -> None:
        assert max_batch_size >= 1 and max_queue >= 1 and max_wait_s >= 0, "batcher limits must be positive"
        assert max_batch_tokens is None or max_batch_tokens > 0, "max_batch_tokens must be positive"
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = math.inf if max_batch_tokens is None else max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._pending: collections.deque[_Entry] = collections.deque()
        self._pending_items = 0
        self._key_items: collections.Counter[Hashable] = collections.Counter()  # waiting items per key
        self._key_costs: collections.Counter[Hashable] = collections.Counter()  # their summed costs
        self._room_waiters: list[asyncio.Future[None]] = []
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
        self._notify_room()  # requests waiting for room get NotReady now
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            logger.warning("micro-batcher did not drain within %.1fs; failing %d queued requests", timeout, len(self._pending))
            self._task.cancel()
            for entry in list(self._pending):
                self._dequeue(entry)
                if not entry.future.done():
                    entry.future.set_exception(NotReady("the service is shutting down"))
        self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def queue_depth(self) -> int:
        """Items waiting for the engine (not counting the batch in flight)."""
        return self._pending_items

    # ------------------------------------------------------------------ requests
    async def submit(self, key: Hashable, items: Sequence[ItemT], *, costs: Sequence[float] | None = None,
                     timeout: float | None = None, wait_for_room: bool = False) -> list[ResultT]:
        """Queue `items` under `key`; return their results in order.

        `costs` (one per item, e.g. its token count) cap a batch at `max_batch_tokens`. With
        `wait_for_room`, a full queue makes the call wait (within `timeout`) instead of raising.
        Raises `QueueFull` (queue at capacity), `RequestTimeout` (no result within `timeout` s),
        `EngineFailed` (the engine raised on this request), `NotReady` (batcher stopped).
        """
        self._check_open()
        if not items:
            return []
        weights = [float(cost) for cost in costs] if costs is not None else [0.0] * len(items)
        assert len(weights) == len(items), f"{len(weights)} costs for {len(items)} items"
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        await self._reserve(len(items), deadline, wait_for_room)
        entry = _Entry(key=key, items=list(items), costs=weights, future=loop.create_future(), enqueued=loop.time(),
                       results=[None] * len(items))
        self._enqueue(entry)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await asyncio.wait_for(entry.future, _remaining(deadline, loop))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no result within request_timeout={timeout:g}s; the judge is overloaded or the "
                                 "request is too large") from None
        finally:
            if entry.queued:  # timed out, cancelled (client gone) or failed with items still waiting: drop them
                self._dequeue(entry)

    def _check_open(self) -> None:
        if self._task is None or self._closing:
            raise NotReady("the service is shutting down", retry_after=self.retry_after)

    async def _reserve(self, count: int, deadline: float, wait_for_room: bool) -> None:
        """Return once `count` more items fit in the queue; QueueFull (or a wait, if allowed) otherwise."""
        if self._pending_items + count <= self.max_queue:
            return
        if not wait_for_room or count > self.max_queue:
            raise QueueFull(f"the judge queue is full ({self._pending_items} items waiting, max_queue={self.max_queue}); "
                            f"retry after {self.retry_after:g}s", retry_after=self.retry_after)
        loop = asyncio.get_running_loop()
        while self._pending_items + count > self.max_queue:
            waiter: asyncio.Future[None] = loop.create_future()
            self._room_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, _remaining(deadline, loop))
            except asyncio.TimeoutError:
                raise RequestTimeout("no room in the judge queue before request_timeout; the judge is "
                                     "overloaded") from None
            finally:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)
            self._check_open()

    def _notify_room(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

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
            while not self._closing and not self._full(head.key):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            parts = self._take(head.key)
            if parts:
                try:
                    await self._execute(head.key, parts, isolate=len(parts) > 1)
                    self._last_batch_end = loop.time()
                except Exception:  # never let one bad batch kill the dispatcher
                    logger.exception("micro-batcher: unexpected error while executing a batch")
                    for part in parts:
                        _fail(part.entry, EngineFailed("internal error while judging this batch"))

    def _full(self, key: Hashable) -> bool:
        """Enough items of `key` wait to fill a batch (by count or by cost)."""
        return self._key_items[key] >= self.max_batch_size or self._key_costs[key] >= self.max_batch_tokens

    def _enqueue(self, entry: _Entry) -> None:
        self._pending.append(entry)
        self._key_items[entry.key] += len(entry.items)
        self._key_costs[entry.key] += sum(entry.costs)
        self._set_pending_items(self._pending_items + len(entry.items))

    def _release(self, entry: _Entry, stop: int) -> None:
        """Items[dispatched:stop] leave the queue (handed to the engine, or dropped)."""
        count = stop - entry.dispatched
        self._key_items[entry.key] -= count
        self._key_costs[entry.key] -= sum(entry.costs[entry.dispatched:stop])
        if not self._key_items[entry.key]:
            del self._key_items[entry.key]
            self._key_costs.pop(entry.key, None)
        entry.dispatched = stop
        if not entry.waiting:
            self._pending.remove(entry)
            entry.queued = False
        self._set_pending_items(self._pending_items - count)

    def _dequeue(self, entry: _Entry) -> None:
        """Drop every item of `entry` that is still waiting."""
        if entry.queued:
            self._release(entry, len(entry.items))

    def _take(self, key: Hashable) -> list[_Part]:
        """FIFO items of `key` up to `max_batch_size` items and `max_batch_tokens` cost (at least one item)."""
        parts: list[_Part] = []
        size, cost = 0, 0.0
        for entry in list(self._pending):
            if entry.key != key:
                continue
            if entry.future.done():  # timed out, cancelled or failed while waiting: never judge it
                self._dequeue(entry)
                continue
            start = stop = entry.dispatched
            while stop < len(entry.items) and size < self.max_batch_size:
                if size and cost + entry.costs[stop] > self.max_batch_tokens:
                    break
                size, cost, stop = size + 1, cost + entry.costs[stop], stop + 1
            if stop > start:
                parts.append(_Part(entry, start, stop))
                self._release(entry, stop)
            if stop < len(entry.items):  # the batch is full; later requests wait their turn (FIFO)
                break
        return parts

    async def _execute(self, key: Hashable, parts: list[_Part], *, isolate: bool) -> None:
        loop = asyncio.get_running_loop()
        items = [item for part in parts for item in part.entry.items[part.start:part.stop]]
        assert self._executor is not None
        started = time.perf_counter()
        try:
            results = list(await loop.run_in_executor(self._executor, self._run_batch, key, items))
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            self._observe(key, len(items), len(parts), time.perf_counter() - started, failed=True)
            if isolate:
                logger.warning("engine batch of %d requests failed (%s); re-running each request alone",
                               len(parts), type(exc).__name__)
                for part in parts:
                    if not part.entry.future.done():
                        await self._execute(key, [part], isolate=False)
                return
            logger.error("engine failed on a request of %d items: %s: %s", len(items), type(exc).__name__, exc)
            message = f"the engine failed on this request ({type(exc).__name__}: {exc})"
            for part in parts:
                _fail(part.entry, EngineFailed(message[:500]))
            return
        self._observe(key, len(items), len(parts), time.perf_counter() - started, failed=False)
        offset = 0
        for part in parts:
            entry, count = part.entry, part.stop - part.start
            if not entry.future.done():
                entry.results[part.start:part.stop] = results[offset:offset + count]
                entry.finished += count
                if entry.finished == len(entry.items):
                    entry.future.set_result(entry.results)
            offset += count

    def _observe(self, key: Hashable, items: int, requests: int, seconds: float, *, failed: bool) -> None:
        if self._on_batch is not None:
            self._on_batch(key, items, requests, seconds, failed)

    def _set_pending_items(self, value: int) -> None:
        freed = value < self._pending_items
        self._pending_items = value
        if self._on_queue_depth is not None:
            self._on_queue_depth(value)
        if freed:
            self._notify_room()


def _fail(entry: _Entry, error: Exception) -> None:
    if not entry.future.done():
        entry.future.set_exception(error)


def _remaining(deadline: float, loop: asyncio.AbstractEventLoop) -> float | None:
    return None if deadline == math.inf else max(0.0, deadline - loop.time())
