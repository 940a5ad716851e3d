"""`rlaif serve --ray`: the judge app as a Ray Serve deployment, on a local Ray cluster (127.0.0.1).

One deployment of 2 replicas, each loading the real embedded model, goes through:
- 16 concurrent clients: every caller gets its own answer, equal to in-process judging of its
  item; the requests are spread over both replicas (the `x-rlaif-replica` header on each response,
  and each replica's own `rlaif_requests_total` collected through a Ray Serve broadcast);
- the app's contract through the proxy: auth (401 in the one error shape) and OpenRLHF `/get_reward`;
- a redeploy (rolling restart) while clients keep sending: no request fails;
- SIGKILL of one replica's process: the service keeps answering, and Ray Serve brings a new
  replica up;
- shutdown: the port closes and the replica processes exit.

The command itself (`rlaif serve --ray`) is tested in `tests/test_ray_serve_cli.py`.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import free_port

ray = pytest.importorskip("ray")

KEY = "ray-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def item(i: int) -> dict:
    return {"prompt": f"What is {i} + 2?", "response_a": f"It is {i + 2}.", "response_b": f"It is {i + 3}, I think."}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def ray_cluster():
    import logging

    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # see tests/test_ray_labeling.py
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 * 2**20, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_two_replicas_spread_answer_survive_restarts_and_shut_down(ray_cluster, default_engine):
    from ray import serve

    from rlaif.judge.judges import PairwiseJudge
    from rlaif.judge.types import PairwiseItem
    from rlaif.service.client import JudgeClient, RetryPolicy
    from rlaif.service.ray_serve import REPLICA_HEADER, ServeOptions, deploy, replica_status
    from rlaif.service.settings import ServiceSettings

    port = free_port()
    settings = ServiceSettings(port=port, cache=False, api_keys=KEY, max_wait_ms=20)
    options = ServeOptions(replicas=2, num_cpus=0.5)  # 2 replicas + a rolling restart's extra ones fit in 2 CPUs
    deploy(settings, options)
    base = f"http://127.0.0.1:{port}"
    try:
        # --- 16 concurrent clients, 2 requests each; every answer is its own item's in-process judgment.
        expected = {i: j.prob_a for i, j in enumerate(PairwiseJudge(default_engine, "helpfulness").judge(
            [PairwiseItem(**item(i)) for i in range(32)]))}

        def call(i: int) -> tuple[int, str, float]:
            response = httpx.post(f"{base}/v1/judge/pairwise", json={"items": [item(i)]}, headers=HEADERS, timeout=300)
            assert response.status_code == 200, response.text
            return i, response.headers[REPLICA_HEADER], response.json()["judgments"][0]["prob_a"]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, range(32)))
        for i, _, prob_a in answers:
            assert prob_a == pytest.approx(expected[i], abs=1e-4), f"item {i} got another caller's answer"
        by_replica = collections.Counter(replica for _, replica, _ in answers)
        assert len(by_replica) == 2, f"requests were not spread over both replicas: {dict(by_replica)}"

        status = replica_status(options.app_name)
        assert {s["replica"] for s in status} == set(by_replica) and all(s["status"] == "ready" for s in status)
        for replica in status:  # each replica counted exactly the requests its header claimed
            line = next(line for line in replica["metrics"].splitlines()
                        if line.startswith('rlaif_requests_total{endpoint="/v1/judge/pairwise",method="POST",status="200"}'))
            assert float(line.rsplit(" ", 1)[1]) == by_replica[replica["replica"]]

        # --- the app's contract holds through the proxy.
        refused = httpx.post(f"{base}/v1/judge/pairwise", json={"items": [item(0)]}, timeout=60)
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        reward = httpx.post(f"{base}/get_reward", headers=HEADERS, timeout=120, json={
            "query": ["User: What is 2 + 2?\nAssistant: 4"], "prompts": ["User: What is 2 + 2?\nAssistant: "]})
        assert reward.status_code == 200 and len(reward.json()["rewards"]) == 1

        client = JudgeClient(base, api_key=KEY, timeout=300, retry=RetryPolicy(retries=6, backoff=0.5, max_backoff=5))

        # --- rolling restart (a redeploy with changed settings) while a client keeps sending: nothing fails.
        failures: list[str] = []
        served: list[float] = []
        stop = threading.Event()

        def keep_sending() -> None:
            k = 0
            while not stop.is_set():
                try:
                    [judgment] = client.pairwise([item(k % 32)])
                    served.append(abs(judgment.prob_a - expected[k % 32]))
                except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                    failures.append(repr(exc))
                k += 1

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            # Changed settings (as when an operator retunes the batcher) are a new code version for Ray Serve:
            # it replaces the replicas one by one while the old ones drain.
            deploy(settings.model_copy(update={"max_wait_ms": 25.0}), options)
            new = wait_until(lambda: (lambda s: s if len(s) == 2 and not {x["replica"] for x in s} & set(by_replica)
                                      else None)(replica_status(options.app_name)), 240, "two new replicas")
        finally:
            stop.set()
            sender.join(timeout=300)
        assert not failures, f"requests failed during the rolling restart: {failures[:3]}"
        assert served and max(served) < 1e-4

        # --- SIGKILL one replica's process: answers keep coming, and Ray Serve replaces the replica.
        victim = new[0]
        os.kill(victim["pid"], signal.SIGKILL)
        for i in range(8):
            [judgment] = client.pairwise([item(i)])
            assert judgment.prob_a == pytest.approx(expected[i], abs=1e-4)
        recovered = wait_until(lambda: (lambda s: s if len(s) == 2 and victim["replica"] not in {x["replica"] for x in s}
                                        and all(x["status"] == "ready" for x in s) else None)(
            replica_status(options.app_name, timeout_s=10)), 240, "a replacement replica")
        pids = [s["pid"] for s in recovered]
        client.close()
    finally:
        serve.shutdown()

    # --- clean shutdown: nothing listens on the port any more, and the replica processes are gone.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=5)
    wait_until(lambda: not any(alive(pid) for pid in pids), 60, "replica processes to exit")
