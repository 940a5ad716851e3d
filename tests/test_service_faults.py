"""The service under faults and bad input, on a real uvicorn server with the deterministic engine.

Covers: auth, 429 under a saturated queue, 503 on engine failure (and recovery), failure
isolation inside a shared batch, 504 timeouts, not-ready states, graceful shutdown, every
bad-input case (always a clear 4xx in the one `ErrorResponse` shape, never a 500), the
`/get_reward` prefix policy, the reward-model routes, and metrics. The real model is
exercised in `test_service.py`.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from rlaif.service.app import create_app
from rlaif.service.settings import ServiceSettings
from tests.fake_engines import (PAIR_ITEM, POISON, SCORE_ITEM, DeterministicEngine, LengthRewardScorer, ServerThread,
                                error_of, in_thread, metric, serve, wait_until)

@pytest.fixture(scope="module")
def limited():
    """One server with small limits shared by the table-driven bad-input tests."""
    engine = DeterministicEngine()
    with serve(engine, max_items=4, get_reward_max_items=6, max_queue=8, max_chars=100,
               max_body_bytes=4096) as (server, client):
        yield client


# ------------------------------------------------------------------------------ bad input
RAW_CASES = [
    # (body bytes, expected status, expected code, text the message must contain) -- one comment each
    (b'{"items": [', 400, "bad_request", "malformed JSON"),                     # truncated JSON
    (b"\xff\xfe{}", 400, "bad_request", "UTF-8"),                               # invalid UTF-8 bytes
    (b'{"items": "x"}', 422, "invalid_request", "items"),                       # wrong type for items
    (b'{"items": [1, 2]}', 422, "invalid_request", "items.0"),                  # items are not objects
    (b'{"items": []}', 422, "invalid_request", "items"),                        # empty list
    (b'{"items": [{"prompt": "p"}]}', 422, "invalid_request", "items.0.response"),  # missing field
    (b'{"items": [{"prompt": 5, "response": "r"}]}', 422, "invalid_request", "items.0.prompt"),  # number for string
    (b'{"items": [{"prompt": "", "response": "r"}]}', 422, "invalid_request", "items.0.prompt"),  # empty prompt
    (b'{"items": [{"prompt": "p", "response": "r", "x": 1}]}', 422, "invalid_request", "x"),  # unknown field
    (b'{"items": [{"prompt": "p", "response": "r"}], "rubirc": "a"}', 422, "invalid_request", "rubirc"),  # typo
    (b'{"items": [{"prompt": "p", "response": "r"}], "mode": "fast"}', 422, "invalid_request", "mode"),  # bad Literal
    (b'{"items": [{"prompt": "\\ud800", "response": "r"}]}', 422, "invalid_request", "items.0.prompt"),  # lone surrogate
    (b"[]", 422, "invalid_request", "body"),                                     # JSON array instead of object
    (b"null", 422, "invalid_request", "body"),                                   # JSON null
    (b"", 422, "invalid_request", "body"),                                       # empty body
]


@pytest.mark.parametrize(("body", "status", "code", "needle"), RAW_CASES)
def test_bad_score_requests_get_clear_4xx(limited, body, status, code, needle):
    response = limited.post("/v1/judge/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error.code == code
    assert needle in error.message


JSON_CASES = [
    # (path, json body, status, code, text the message must contain)
    ("/v1/judge/score", {"items": [SCORE_ITEM] * 5}, 413, "payload_too_large", "max_items=4"),  # too many items
    ("/v1/judge/score", {"items": [{"prompt": "p", "response": "x" * 101}]}, 413, "payload_too_large",
     "max_chars=100"),                                                                          # huge string
    ("/v1/judge/pairwise", {"items": [{**PAIR_ITEM, "response_b": "y" * 101}]}, 413, "payload_too_large",
     "items.0.response_b"),                                                                     # names the field
    ("/v1/judge/score", {"items": [SCORE_ITEM], "rubric": "no-such-rubric"}, 404, "rubric_not_found",
     "no-such-rubric"),                                                                         # unknown rubric
    ("/v1/judge/score", {"items": [SCORE_ITEM], "rubric": "../../etc/passwd"}, 404, "rubric_not_found",
     "passwd"),                                                                                 # never a file path
    ("/v1/judge/score", {"items": [SCORE_ITEM], "rubric": "helpfulness"}, 422, "invalid_request",
     "pairwise rubric"),                                                                        # wrong rubric kind
    ("/v1/judge/pairwise", {"items": [PAIR_ITEM], "mode": "cot"}, 422, "invalid_request", "cot"),  # no CoT section
    ("/v1/rewards", {"items": [SCORE_ITEM], "mode": "pairwise"}, 422, "invalid_request", "reference"),  # no reference
    ("/v1/rewards", {"items": [SCORE_ITEM], "mode": "reward_model"}, 422, "invalid_request",
     "--reward-model"),                                                                         # no RM served
    ("/get_reward", {"query": ["ab"], "prompts": ["a", "b"]}, 422, "invalid_request", "one prompt per query"),
    ("/get_reward", {"query": ["hello"], "prompts": [""]}, 422, "invalid_request", "empty"),   # empty prompt
    ("/get_reward", {"query": ["q"] * 7, "prompts": ["q"] * 7}, 413, "payload_too_large",
     "get_reward_max_items=6"),                                                                 # its own, larger limit
]


@pytest.mark.parametrize(("path", "body", "status", "code", "needle"), JSON_CASES)
def test_bad_requests_name_the_problem(limited, path, body, status, code, needle):
    response = limited.post(path, json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error.code == code
    assert needle in error.message


def test_body_over_max_body_bytes_is_413(limited):
    body = json.dumps({"items": [{"prompt": "p" * 50, "response": "r"}] * 60}).encode()
    assert len(body) > 4096
    response = limited.post("/v1/judge/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "max_body_bytes=4096" in error_of(response).message


def test_unknown_rubric_detail_and_routes_use_the_error_shape(limited):
    assert error_of(limited.get("/v1/rubrics/nope")).code == "rubric_not_found"
    assert error_of(limited.get("/no/such/path")).code == "not_found"
    assert error_of(limited.get("/v1/judge/score")).code == "method_not_allowed"


def test_validation_errors_list_each_field(limited):
    response = limited.post("/v1/judge/pairwise", json={"items": [{"prompt": "", "response_a": 1}]})
    error = error_of(response)
    locs = {detail.loc for detail in error.details or []}
    assert {"items.0.prompt", "items.0.response_a", "items.0.response_b"} <= locs


# ------------------------------------------------------------------------------ auth
def test_api_keys_guard_everything_but_health(capfd):
    keys = "alpha-key-123,beta-key-456"
    with serve(api_keys=keys) as (_, client):
        missing = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert error_of(missing).code == "unauthorized"
        wrong = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        not_bearer = client.get("/v1/rubrics", headers={"Authorization": "Basic YWxwaGEta2V5LTEyMw=="})
        assert not_bearer.status_code == 401
        ok = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]}, headers={"Authorization": "Bearer beta-key-456"})
        assert ok.status_code == 200
        for path in ("/v1/rubrics", "/v1/rubrics/helpfulness", "/metrics"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer alpha-key-123"}).status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        non_ascii = client.get("/v1/rubrics", headers={"Authorization": "Bearer caf\u00e9".encode()})
        assert non_ascii.status_code == 401
    out, err = capfd.readouterr()
    assert "alpha-key-123" not in out + err and "beta-key-456" not in out + err
    assert "alpha-key-123" not in repr(ServiceSettings(api_keys=keys))


# ------------------------------------------------------------------------------ load and faults
def test_saturated_queue_gets_429_with_retry_after_then_recovers():
    engine = DeterministicEngine()
    engine.hold()
    with serve(engine, max_items=2, max_queue=2, max_batch_size=1, retry_after=3) as (_, client):
        first, first_box = in_thread(client.post, "/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert engine.entered.wait(10)  # first request is inside the engine; the queue is empty
        queued = [in_thread(client.post, "/v1/judge/score", json={"items": [{**SCORE_ITEM, "response": str(i)}]})
                  for i in range(2)]
        wait_until(lambda: metric(client, "rlaif_queue_depth_items") == 2)
        rejected = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == "3"
        assert error_of(rejected).code == "queue_full" and "max_queue=2" in error_of(rejected).message
        engine.release()
        for thread, box in [(first, first_box), *queued]:
            thread.join(10)
            assert box["result"].status_code == 200
        assert client.post("/v1/judge/score", json={"items": [SCORE_ITEM]}).status_code == 200
        assert metric(client, "rlaif_requests_total", endpoint="/v1/judge/score", status="429") == 1


def test_engine_failure_is_503_and_the_service_keeps_serving():
    engine = DeterministicEngine()
    with serve(engine) as (_, client):
        engine.fail_next(1)
        failed = client.post("/v1/judge/pairwise", json={"items": [PAIR_ITEM]})
        assert failed.status_code == 503
        error = error_of(failed)
        assert error.code == "engine_failed" and "injected engine failure" in error.message
        healthy = client.post("/v1/judge/pairwise", json={"items": [PAIR_ITEM]})
        assert healthy.status_code == 200 and len(healthy.json()["judgments"]) == 1
        assert metric(client, "rlaif_engine_errors_total", kind="pairwise") == 1
        assert client.get("/readyz").status_code == 200


def test_poisoned_request_fails_alone_even_when_batched_with_others():
    engine = DeterministicEngine()
    engine.hold()
    with serve(engine, max_wait_ms=0) as (_, client):
        blocker = in_thread(client.post, "/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert engine.entered.wait(10)
        good = in_thread(client.post, "/v1/judge/score", json={"items": [{"prompt": "p", "response": "fine"}]})
        bad = in_thread(client.post, "/v1/judge/score", json={"items": [{"prompt": "p", "response": POISON}]})
        wait_until(lambda: metric(client, "rlaif_queue_depth_items") == 2)
        engine.release()
        for thread, _ in (blocker, good, bad):
            thread.join(10)
        assert blocker[1]["result"].status_code == 200
        assert good[1]["result"].status_code == 200
        assert bad[1]["result"].status_code == 503 and "poisoned" in error_of(bad[1]["result"]).message
        assert 2 in engine.batch_sizes  # good and bad really were in one engine batch first


def test_request_timeout_is_504_and_later_requests_succeed():
    engine = DeterministicEngine()
    engine.hold()
    with serve(engine, request_timeout=0.3) as (_, client):
        started = time.perf_counter()
        slow = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert slow.status_code == 504 and error_of(slow).code == "timeout"
        assert 0.25 < time.perf_counter() - started < 5
        queued = client.post("/v1/judge/score", json={"items": [{"prompt": "p", "response": "queued"}]})
        assert queued.status_code == 504  # timed out while waiting behind the stuck batch...
        assert metric(client, "rlaif_queue_depth_items") == 0  # ...and left the queue
        engine.release()
        assert client.post("/v1/judge/score", json={"items": [SCORE_ITEM]}).status_code == 200


def test_not_ready_while_loading_then_ready(monkeypatch):
    import rlaif.service.app as app_module

    gate = threading.Event()
    engine = DeterministicEngine()

    def slow_load(settings, given=None):
        gate.wait(10)
        return engine, None, None

    monkeypatch.setattr(app_module, "load_components", slow_load)
    app = create_app(ServiceSettings(cache=False))  # no engine given: it loads in the background
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        busy = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert busy.status_code == 503 and error_of(busy).code == "not_ready" and "retry-after" in busy.headers
        assert client.get("/v1/rubrics").status_code == 200  # rubric catalog is there before the model
        gate.set()
        wait_until(lambda: client.get("/readyz").status_code == 200)
        assert client.get("/readyz").json()["engine"] == "fake:deterministic"
        assert client.post("/v1/judge/score", json={"items": [SCORE_ITEM]}).status_code == 200


def test_failed_model_load_is_reported_and_health_stays_up():
    app = create_app(ServiceSettings(cache=False, engine="not-a-valid-spec"))
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        wait_until(lambda: client.get("/readyz").json()["status"] == "failed")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "invalid engine spec" in ready.json()["message"]
        assert client.get("/healthz").status_code == 200
        busy = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert busy.status_code == 503 and "invalid engine spec" in error_of(busy).message
        assert "retry-after" not in busy.headers  # a failed load will not fix itself


def test_graceful_shutdown_finishes_in_flight_and_queued_requests():
    engine = DeterministicEngine()
    engine.hold()
    app = create_app(ServiceSettings(cache=False, max_wait_ms=0), engine=engine)
    server = ServerThread(app, timeout_graceful_shutdown=20).start()
    client = httpx.Client(base_url=server.url, timeout=30)
    in_flight = in_thread(client.post, "/v1/judge/score", json={"items": [SCORE_ITEM]})
    assert engine.entered.wait(10)
    queued = in_thread(client.post, "/v1/judge/score", json={"items": [{"prompt": "p", "response": "q"}]})
    wait_until(lambda: metric(client, "rlaif_queue_depth_items") == 1)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    time.sleep(0.3)  # shutdown has begun while both requests wait on the engine
    engine.release()
    for thread, box in (in_flight, queued):
        thread.join(20)
        assert box["result"].status_code == 200, box
    stopper.join(30)
    assert not server.thread.is_alive()
    client.close()


# ------------------------------------------------------------------------------ routes
def test_get_reward_prefix_policy_whole_query():
    with serve(prefix_mismatch="whole_query") as (_, client):
        response = client.post("/get_reward", json={"query": ["Q: hi A: yo", "something else"],
                                                      "prompts": ["Q: hi A:", "Q: other"], "labels": [None, "x"]})
        assert response.status_code == 200
        body = response.json()
        assert body["extra_logs"]["prefix_mismatch"] == [0.0, 1.0]
        direct = client.post("/v1/judge/score", json={"items": [
            {"prompt": "Q: hi A:", "response": " yo"}, {"prompt": "Q: other", "response": "something else"}]}).json()
        assert body["rewards"] == pytest.approx([j["score"] for j in direct["judgments"]], abs=1e-12)


def test_reward_model_routes():
    scorer = LengthRewardScorer()
    with serve(reward_model=scorer) as (_, client):
        rewards = client.post("/v1/rewards", json={"mode": "reward_model", "items": [
            {"prompt": "p", "response": "x" * 20}, {"prompt": "p", "response": ""}]}).json()
        assert rewards["rewards"] == [1.0, -1.0] and rewards["details"][0]["reward_model_score"] == 1.0
        remote = client.post("/get_reward", json={"query": ["p" + "x" * 30], "prompts": ["p"]}).json()
        assert remote["rewards"] == [2.0]
        assert remote["scores"] == pytest.approx([1 / (1 + 2.718281828459045 ** -2.0)])
        assert remote["extra_logs"] == {"reward_model_score": [2.0], "prefix_mismatch": [0.0], "prefix_recovered": [0.0],
                                        "template_stripped": [0.0]}
        assert client.get("/readyz").json()["reward_model"] is not None


def test_judge_and_reward_endpoints_share_batches_per_key():
    engine = DeterministicEngine()
    engine.hold()
    with serve(engine, max_wait_ms=0) as (_, client):
        blocker = in_thread(client.post, "/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert engine.entered.wait(10)
        calls = [in_thread(client.post, "/v1/judge/score", json={"items": [{"prompt": "a", "response": "1"}]}),
                 in_thread(client.post, "/v1/rewards", json={"items": [{"prompt": "b", "response": "2"}]}),
                 in_thread(client.post, "/get_reward", json={"query": ["c3"], "prompts": ["c"]}),
                 in_thread(client.post, "/v1/judge/pairwise", json={"items": [PAIR_ITEM]})]
        wait_until(lambda: metric(client, "rlaif_queue_depth_items") == 4)
        engine.release()
        for thread, box in (blocker, *calls):
            thread.join(10)
            assert box["result"].status_code == 200
        # three score-kind requests from three endpoints formed one batch; the pairwise one ran apart
        assert metric(client, "rlaif_batch_size_requests_count", kind="score") == 2
        assert metric(client, "rlaif_batch_size_requests_sum", kind="score") == 4
        assert metric(client, "rlaif_batch_size_requests_count", kind="pairwise") == 1


def test_metrics_expose_the_documented_series():
    with serve() as (_, client):
        client.post("/v1/judge/score", json={"items": [SCORE_ITEM, SCORE_ITEM]})
        text = client.get("/metrics").text
        for series in ("rlaif_requests_total", "rlaif_request_duration_seconds_bucket", "rlaif_batch_size_items_bucket",
                       "rlaif_batch_size_requests_bucket", "rlaif_queue_depth_items", "rlaif_judgments_total",
                       "rlaif_judgments_per_second", "rlaif_engine_seconds_bucket", "rlaif_model_ready"):
            assert series in text, series
        assert metric(client, "rlaif_judgments_total", kind="score") == 2
        assert metric(client, "rlaif_model_ready") == 1
