"""`MicroBatcher` on its own: coalescing, routing of results, keys, limits, timeouts, failures, shutdown.

`run_batch` here is a plain function that records every batch it gets, so each test can pin
exactly which items were judged together.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rlaif.service.batcher import MicroBatcher
from rlaif.service.errors import EngineFailed, NotReady, QueueFull, RequestTimeout


class Recorder:
    """run_batch double: returns (key, item * 10) per item, records batches, can block or fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[object, list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_if = lambda items: False

    def __call__(self, key, items):
        self.started.set()
        self.gate.wait(10)
        self.batches.append((key, list(items)))
        if self.fail_if(items):
            raise RuntimeError("boom")
        return [(key, item * 10) for item in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def make(recorder: Recorder, **overrides) -> MicroBatcher:
    options = {"max_batch_size": 8, "max_wait_s": 0.05, "max_queue": 64, "retry_after": 2.0} | overrides
    return MicroBatcher(recorder, **options)


def test_concurrent_requests_share_a_batch_and_get_their_own_results_in_order():
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit("k", [i, i + 100]) for i in range(4)))
        await batcher.stop()
        return results

    results = run(scenario())
    assert results == [[("k", i * 10), ("k", (i + 100) * 10)] for i in range(4)]
    assert len(recorder.batches) == 1 and len(recorder.batches[0][1]) == 8  # all four requests coalesced


def test_batches_never_exceed_max_batch_size_and_large_requests_are_split():
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder, max_batch_size=5)
        await batcher.start()
        sizes = [2, 2, 2, 7, 1]  # the 7-item request exceeds the batch size: it is split across batches
        results = await asyncio.gather(*(batcher.submit("k", [100 * r + i for i in range(n)])
                                         for r, n in enumerate(sizes)))
        await batcher.stop()
        return sizes, results

    sizes, results = run(scenario())
    # every request gets its own results, in order, however its items were spread over batches
    assert results == [[("k", (100 * r + i) * 10) for i in range(n)] for r, n in enumerate(sizes)]
    # FIFO packing, filling each batch: [2+2+1 of the third], [its last 1 + 4 of the 7], [the 7's last 3 + 1]
    assert [len(items) for _, items in recorder.batches] == [5, 5, 4]
    assert recorder.batches[1][1] == [201, 300, 301, 302, 303]


def test_requests_with_different_keys_are_never_mixed():
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(("score", f"r{i % 2}"), [i]) for i in range(6)))
        await batcher.stop()
        return results

    results = run(scenario())
    assert results == [[(("score", f"r{i % 2}"), i * 10)] for i in range(6)]
    for key, items in recorder.batches:
        assert all(item % 2 == int(key[1][1]) for item in items), "a batch mixed two keys"
    assert len(recorder.batches) == 2


def test_single_request_is_not_delayed_much_beyond_max_wait():
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder, max_wait_s=0.05)
        await batcher.start()
        started = time.perf_counter()
        await batcher.submit("k", [1])
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert run(scenario()) < 1.0


def test_queue_full_raises_with_retry_after_and_frees_after_the_batch():
    recorder = Recorder()
    recorder.gate.clear()

    async def scenario():
        batcher = make(recorder, max_queue=3, max_wait_s=0.0)
        await batcher.start()
        running = asyncio.create_task(batcher.submit("k", [1]))
        while not recorder.started.is_set():  # first batch is in the engine now, queue empty
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(batcher.submit("k", [2, 3, 4]))
        await asyncio.sleep(0.05)
        assert batcher.queue_depth == 3
        with pytest.raises(QueueFull) as excinfo:
            await batcher.submit("k", [5])
        recorder.gate.set()
        results = await asyncio.gather(running, waiting)
        after = await batcher.submit("k", [6])  # capacity is back
        await batcher.stop()
        return excinfo.value, results, after

    error, results, after = run(scenario())
    assert error.retry_after == 2.0 and error.headers() == {"Retry-After": "2"}
    assert "max_queue=3" in error.message
    assert results == [[("k", 10)], [("k", 20), ("k", 30), ("k", 40)]]
    assert after == [("k", 60)]


def test_timed_out_request_leaves_the_queue_and_is_never_judged():
    recorder = Recorder()
    recorder.gate.clear()

    async def scenario():
        batcher = make(recorder, max_wait_s=0.0)
        await batcher.start()
        blocker = asyncio.create_task(batcher.submit("k", [1]))
        while not recorder.started.is_set():
            await asyncio.sleep(0.005)
        with pytest.raises(RequestTimeout):
            await batcher.submit("k", [99], timeout=0.05)
        depth = batcher.queue_depth
        recorder.gate.set()
        await blocker
        await batcher.stop()
        return depth

    assert run(scenario()) == 0
    assert all(99 not in items for _, items in recorder.batches)


def test_failing_batch_is_isolated_per_request():
    recorder = Recorder()
    recorder.fail_if = lambda items: 13 in items  # a "poisoned" input
    recorder.gate.clear()

    async def scenario():
        batcher = make(recorder, max_wait_s=0.0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit("k", [1]))
        while not recorder.started.is_set():
            await asyncio.sleep(0.005)
        good = asyncio.create_task(batcher.submit("k", [2]))
        bad = asyncio.create_task(batcher.submit("k", [13]))
        await asyncio.sleep(0.05)
        recorder.gate.set()
        outcomes = await asyncio.gather(first, good, bad, return_exceptions=True)
        again = await batcher.submit("k", [3])  # the batcher keeps serving
        await batcher.stop()
        return outcomes, again

    (first, good, bad), again = run(scenario())
    assert first == [("k", 10)] and good == [("k", 20)] and again == [("k", 30)]
    assert isinstance(bad, EngineFailed) and "boom" in bad.message
    assert ("k", [2, 13]) in recorder.batches  # they did share a batch before isolation


def test_stop_drains_queued_work_then_refuses_new_requests():
    recorder = Recorder()
    recorder.gate.clear()

    async def scenario():
        batcher = make(recorder, max_wait_s=0.0)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit("k", [i])) for i in range(3)]
        while not recorder.started.is_set():
            await asyncio.sleep(0.005)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        recorder.gate.set()
        await stopping
        results = await asyncio.gather(*tasks)
        with pytest.raises(NotReady):
            await batcher.submit("k", [9])
        return results

    assert run(scenario()) == [[("k", i * 10)] for i in range(3)]


def test_batches_are_capped_by_tokens_as_well_as_items():
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder, max_batch_size=8, max_batch_tokens=100)
        await batcher.start()
        # (items, cost per item): 3 x 40 does not fit in 100 beside anything; a 150-cost item runs alone
        requests = [([1, 2, 3], 40), ([4], 10), ([5], 150), ([6, 7], 30)]
        results = await asyncio.gather(*(batcher.submit("k", items, costs=[cost] * len(items))
                                         for items, cost in requests))
        await batcher.stop()
        return results

    results = run(scenario())
    assert results == [[("k", 10), ("k", 20), ("k", 30)], [("k", 40)], [("k", 50)], [("k", 60), ("k", 70)]]
    # [1, 2] = 80 (+3 would be 120); [3, 4] = 50 (+5 would be 200); [5] = 150 alone (over the cap, but one
    # item always runs); [6, 7] = 60
    assert [items for _, items in recorder.batches] == [[1, 2], [3, 4], [5], [6, 7]]


def test_a_cancelled_request_leaves_the_queue_and_is_never_judged():
    """What a client disconnect does: the HTTP handler awaiting `submit` is cancelled."""
    recorder = Recorder()
    recorder.gate.clear()

    async def scenario():
        batcher = make(recorder, max_wait_s=0.0, max_batch_size=2)
        await batcher.start()
        blocker = asyncio.create_task(batcher.submit("k", [1]))
        while not recorder.started.is_set():
            await asyncio.sleep(0.005)
        gone = asyncio.create_task(batcher.submit("k", [50, 51, 52, 53]))  # would need two batches
        kept = asyncio.create_task(batcher.submit("k", [7]))
        await asyncio.sleep(0.05)
        assert batcher.queue_depth == 5
        gone.cancel()
        await asyncio.sleep(0.01)
        depth = batcher.queue_depth
        recorder.gate.set()
        results = await asyncio.gather(blocker, kept)
        await batcher.stop()
        return depth, results

    depth, results = run(scenario())
    assert depth == 1 and results == [[("k", 10)], [("k", 70)]]
    assert all(not {50, 51, 52, 53} & set(items) for _, items in recorder.batches)


def test_a_split_request_that_fails_drops_its_remaining_items():
    recorder = Recorder()
    recorder.fail_if = lambda items: 13 in items

    async def scenario():
        batcher = make(recorder, max_wait_s=0.0, max_batch_size=2)
        await batcher.start()
        with pytest.raises(EngineFailed):
            await batcher.submit("k", [13, 14, 15, 16, 17])  # fails in its first batch
        depth = batcher.queue_depth
        after = await batcher.submit("k", [1])
        await batcher.stop()
        return depth, after

    depth, after = run(scenario())
    assert depth == 0 and after == [("k", 10)]
    assert [items for _, items in recorder.batches] == [[13, 14], [1]]  # 15..17 were never judged


def test_wait_for_room_queues_when_capacity_returns_instead_of_429():
    recorder = Recorder()
    recorder.gate.clear()

    async def scenario():
        batcher = make(recorder, max_queue=2, max_wait_s=0.0, max_batch_size=2)
        await batcher.start()
        running = asyncio.create_task(batcher.submit("k", [1]))
        while not recorder.started.is_set():
            await asyncio.sleep(0.005)
        filler = asyncio.create_task(batcher.submit("k", [2, 3]))  # the queue is full now
        await asyncio.sleep(0.02)
        with pytest.raises(QueueFull):
            await batcher.submit("k", [4])
        patient = asyncio.create_task(batcher.submit("k", [4, 5], wait_for_room=True, timeout=10))
        with pytest.raises(RequestTimeout):  # waiting for room still honours the timeout
            await batcher.submit("k", [9], wait_for_room=True, timeout=0.05)
        recorder.gate.set()
        return await asyncio.gather(running, filler, patient)

    assert run(scenario()) == [[("k", 10)], [("k", 20), ("k", 30)], [("k", 40), ("k", 50)]]
    assert all(9 not in items for _, items in recorder.batches)
