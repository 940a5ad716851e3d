"""`rlaif.service.client`: import weight, typed methods, error mapping and retry behaviour against a real server.

Retries are checked from the outside: an httpx event hook counts the requests that really
left the client, and wall-clock time shows whether `Retry-After` was honoured.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from rlaif.service.app import create_app
from rlaif.service.client import (AsyncJudgeClient, JudgeClient, JudgeConnectionError, JudgeServiceError, RetryPolicy,
                            parse_retry_after)
from rlaif.service.settings import ServiceSettings
from tests.conftest import free_port
from tests.fake_engines import DeterministicEngine, LengthRewardScorer, ServerThread

FAST_RETRY = RetryPolicy(retries=3, backoff=0.01, max_backoff=0.05)


def test_importing_the_client_loads_no_torch_transformers_or_engines():
    code = ("import sys, rlaif.service.client; heavy = [m for m in ('torch', 'transformers', 'rlaif.judge.engines', 'rlaif.judge.judges', "
            "'rlaif.judge.rubric', 'numpy', 'fastapi', 'uvicorn', 'prometheus_client') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_protocol_imports_only_pydantic_stdlib_and_judge_types():
    code = ("import sys; before = set(sys.modules); import rlaif.service.protocol; "
            "new = sorted(m.split('.')[0] for m in set(sys.modules) - before); print(sorted(set(new)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = {name for name in json.loads(out.stdout.replace("'", '"')) if not name.startswith("_")}  # _sysconfigdata...
    third_party = loaded - set(sys.stdlib_module_names)
    assert third_party <= {"pydantic", "pydantic_core", "typing_extensions", "typing_inspection", "annotated_types",
                           "rlaif"}, third_party


@pytest.fixture(scope="module")
def server():
    engine = DeterministicEngine()
    app = create_app(ServiceSettings(cache=False, max_items=8, max_queue=16, max_wait_ms=5),
                     engine=engine, reward_model=LengthRewardScorer())
    with ServerThread(app) as running:
        running.engine = engine
        yield running


class Counting:
    """An httpx.Client whose requests are counted (what actually went on the wire)."""

    def __init__(self) -> None:
        self.count = 0
        self.times: list[float] = []
        self.http = httpx.Client(timeout=30, event_hooks={"request": [self._hook]})

    def _hook(self, request: httpx.Request) -> None:
        self.count += 1
        self.times.append(time.monotonic())


def test_typed_methods_round_trip(server):
    with JudgeClient(server.url, retry=FAST_RETRY, max_items=3) as client:
        assert client.health().status == "ok"
        ready = client.ready()
        assert ready.ready and ready.engine == "fake:deterministic"
        pairs = client.pairwise([{"prompt": f"q{i}", "response_a": "a", "response_b": "b"} for i in range(7)])
        assert len(pairs) == 7 and all(0.0 <= j.prob_a <= 1.0 for j in pairs)  # 3 requests of <= 3 items
        assert [j.per_order[0].order for j in pairs] == ["ab"] * 7
        scores = client.score([{"prompt": "q", "response": "r"}], rubric="score-1-10")
        assert scores[0].rubric_id == "score-1-10" and abs(sum(scores[0].distribution.values()) - 1) < 1e-9
        rewards = client.rewards(["q"] * 4, ["r1", "r2", "r3", "r4"], references=["ref"] * 4, mode="pairwise",
                                 scale="signed")
        assert len(rewards.rewards) == 4 and all(-1 <= r <= 1 for r in rewards.rewards)
        assert rewards.rewards == [d.reward for d in rewards.details]
        assert rewards.rewards[0] == pytest.approx(2 * rewards.details[0].pairwise.prob_a - 1)
        remote = client.get_reward(["q: 1", "q: 22"], ["q:", "q:"], labels=["a", "b"])
        assert len(remote.rewards) == 2
        assert set(remote.extra_logs) == {"reward_model_score", "prefix_mismatch", "prefix_recovered", "template_stripped"}
        rubric_ids = [r.id for r in client.rubrics()]
        assert "helpfulness" in rubric_ids and client.rubric("helpfulness").kind == "pairwise"
        assert "secret" not in repr(JudgeClient(server.url, api_key="secret"))


def test_results_match_single_item_requests(server):
    items = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(6)]
    with JudgeClient(server.url, max_items=6) as client:
        together = client.score(items)
        alone = [client.score([item])[0] for item in items]
    assert [j.score for j in together] == pytest.approx([j.score for j in alone], abs=1e-12)


def test_4xx_is_raised_at_once_with_status_and_code(server):
    counting = Counting()
    client = JudgeClient(server.url, retry=FAST_RETRY, http_client=counting.http)
    with pytest.raises(JudgeServiceError) as excinfo:
        client.score([{"prompt": "q", "response": "r"}], rubric="no-such-rubric")
    assert excinfo.value.status == 404 and excinfo.value.code == "rubric_not_found"
    assert "no-such-rubric" in str(excinfo.value)
    assert counting.count == 1  # no retry on 4xx
    with pytest.raises(JudgeServiceError) as excinfo:
        client.pairwise([{"prompt": "q", "response_a": "a", "response_b": "b"}], mode="cot")
    assert excinfo.value.status == 422 and counting.count == 2


def test_503_is_retried_and_succeeds(server):
    counting = Counting()
    client = JudgeClient(server.url, retry=FAST_RETRY, http_client=counting.http)
    server.engine.fail_next(1)
    result = client.score([{"prompt": "retry me", "response": "r"}])
    assert len(result) == 1 and counting.count == 2


def test_503_exhausts_retries_then_raises(server):
    counting = Counting()
    client = JudgeClient(server.url, retry=RetryPolicy(retries=2, backoff=0.01), http_client=counting.http)
    server.engine.fail_next(3)
    with pytest.raises(JudgeServiceError) as excinfo:
        client.score([{"prompt": "still failing", "response": "r"}])
    assert excinfo.value.status == 503 and excinfo.value.code == "engine_failed"
    assert counting.count == 3
    server.engine.fail_next(0)


def test_429_is_retried_after_retry_after():
    engine = DeterministicEngine()
    engine.hold()
    app = create_app(ServiceSettings(cache=False, max_items=1, max_queue=1, max_batch_size=1, retry_after=1),
                     engine=engine)
    with ServerThread(app) as running:
        side = httpx.Client(base_url=running.url, timeout=30)
        blockers = [threading.Thread(target=side.post, args=("/v1/judge/score",),
                                     kwargs={"json": {"items": [{"prompt": "p", "response": str(i)}]}}) for i in range(2)]
        blockers[0].start()
        assert engine.entered.wait(10)
        blockers[1].start()  # fills the one queue slot
        deadline = time.monotonic() + 10
        while "rlaif_queue_depth_items 1.0" not in side.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        threading.Timer(0.3, engine.release).start()  # capacity returns well before Retry-After ends
        counting = Counting()
        client = JudgeClient(running.url, retry=FAST_RETRY, http_client=counting.http)
        started = time.monotonic()
        result = client.score([{"prompt": "p", "response": "late"}])
        assert len(result) == 1
        assert counting.count == 2  # one 429, then success
        assert counting.times[1] - counting.times[0] >= 1.0  # waited Retry-After (1 s), not the 0.01 s backoff
        assert time.monotonic() - started < 10
        for thread in blockers:
            thread.join(10)
        side.close()


def test_connection_errors_are_retried_then_raised():
    counting = Counting()
    port = free_port()  # nothing listens here
    client = JudgeClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(retries=2, backoff=0.01), http_client=counting.http)
    with pytest.raises(JudgeConnectionError) as excinfo:
        client.health()
    assert counting.count == 3 and excinfo.value.status is None and excinfo.value.code == "connection_error"


def test_auth_header_is_sent(server):
    app = create_app(ServiceSettings(cache=False, api_keys="k-1"), engine=DeterministicEngine())
    with ServerThread(app) as running:
        with pytest.raises(JudgeServiceError) as excinfo:
            JudgeClient(running.url, retry=FAST_RETRY).rubrics()
        assert excinfo.value.status == 401
        assert JudgeClient(running.url, api_key="k-1").rubrics()


def test_async_client_sends_chunks_concurrently_and_maps_errors(server):
    async def scenario():
        async with AsyncJudgeClient(server.url, retry=FAST_RETRY, max_items=2) as client:
            judgments = await client.score([{"prompt": f"q{i}", "response": "r"} for i in range(5)])
            rewards = await client.rewards(["q"] * 3, ["a", "bb", "ccc"], mode="reward_model")
            remote = await client.get_reward(["qa", "qbb", "qccc"], ["q", "q", "q"])
            assert (await client.ready()).ready and (await client.health()).status == "ok"
            assert [r.id for r in await client.rubrics()] and (await client.rubric("score-1-10")).kind == "score"
            with pytest.raises(JudgeServiceError) as excinfo:
                await client.pairwise([{"prompt": "q", "response_a": "a", "response_b": "b"}], rubric="score-1-10")
            return judgments, rewards, remote, excinfo.value

    judgments, rewards, remote, error = asyncio.run(scenario())
    assert len(judgments) == 5
    assert rewards.rewards == pytest.approx([-0.9, -0.8, -0.7])
    assert remote.rewards == pytest.approx([-0.9, -0.8, -0.7])  # three chunks merged in order
    assert error.status == 422 and error.code == "invalid_request"


@pytest.mark.parametrize(("header", "expected"), [
    ("3", 3.0),                                 # delta-seconds
    ("", None),                                 # absent
    ("soon", None),                             # garbage is ignored, not trusted
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),     # a date in the past means "now"
])
def test_parse_retry_after(header, expected):
    assert parse_retry_after(header) == expected


def test_backoff_grows_with_jitter_and_honours_retry_after():
    policy = RetryPolicy(retries=5, backoff=0.5, max_backoff=4.0)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert all(2.0 <= policy.delay(0, retry_after=2.0) <= 2.3 for _ in range(50))
