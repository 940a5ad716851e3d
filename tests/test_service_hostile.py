"""The service under hostile or careless clients, on a real uvicorn server (deterministic engine).

Each test pins one reproduced problem: items past the model's context, engine batches without a
token cap, a disconnected client whose items were still judged, a regex that stalled the event
loop, unauthenticated bodies buffered before the key check, connections held by one header byte
a second, unbounded connections, docs open despite API keys, a 100 KB rubric id echoed back,
401 vs 400 for malformed JSON without a key, and a printed curl command with the wrong variable.
Raw sockets are used where a well-behaved HTTP client cannot express the attack.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import threading
import time

import httpx
import pytest

from rlaif.judge.judges import ScoreJudge
from rlaif.judge.types import ScoreItem
from rlaif.service.cli import curl_example
from rlaif.service.serving import RubricCatalog
from rlaif.service.settings import ServiceSettings
from tests.fake_engines import SCORE_ITEM, DeterministicEngine, error_of, in_thread, metric, serve, wait_until


def raw_request(port: int, head: str, body: bytes = b"", *, timeout: float = 5.0) -> bytes:
    """Send a raw HTTP request (head without the final blank line) and read until the server closes or pauses."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        return read_reply(sock)


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(data) + 1


# ------------------------------------------------------------------------------ token budgets
def test_an_item_over_the_token_budget_is_413_naming_the_limit_and_the_setting():
    engine = DeterministicEngine(context_length=600)  # its counts: rendered prompt JSON length / 4
    with serve(engine) as (_, client):
        fine = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert fine.status_code == 200, fine.text
        long = {"prompt": "p", "response": "word " * 800}
        response = client.post("/v1/judge/score", json={"items": [SCORE_ITEM, long]})
        assert response.status_code == 413, response.text
        message = error_of(response).message
        assert "items.1 needs" in message and "max_item_tokens=600" in message
        assert "RLAIF_MAX_ITEM_TOKENS" in message and "context length is 600" in message
        assert not any("word word" in text for text in engine.judged), "an over-budget item reached the engine"
        pair = client.post("/v1/judge/pairwise", json={"items": [{"prompt": "p", "response_a": "a",
                                                                  "response_b": "word " * 800}]})
        assert pair.status_code == 413 and "items.0" in error_of(pair).message
        remote = client.post("/get_reward", json={"query": ["q: " + "word " * 800], "prompts": ["q:"]})
        assert remote.status_code == 413 and "query.0" in error_of(remote).message


def test_max_item_tokens_setting_applies_when_the_engine_reports_no_context():
    with serve(DeterministicEngine(context_length=None), max_item_tokens=400) as (_, client):
        response = client.post("/v1/judge/score", json={"items": [{"prompt": "p", "response": "word " * 400}]})
        assert response.status_code == 413 and "max_item_tokens=400" in error_of(response).message


def test_engine_batches_are_capped_by_tokens_and_a_large_request_is_split():
    engine = DeterministicEngine()
    items = [ScoreItem(prompt=f"question {i:02d}", response="an answer of some length " * 8) for i in range(12)]
    counts = ScoreJudge(engine, "score-1-10").item_token_counts(items)
    assert len(set(counts)) == 1, counts  # equal items, so the cap decides the batch size exactly
    with serve(engine, max_batch_size=64, max_batch_tokens=3 * counts[0] + 1) as (_, client):
        response = client.post("/v1/judge/score", json={"items": [i.model_dump() for i in items]})
        assert response.status_code == 200, response.text
    assert engine.batch_sizes == [3, 3, 3, 3]  # one 12-item request, four engine batches
    served = [j["score"] for j in response.json()["judgments"]]
    assert served == pytest.approx([j.score for j in ScoreJudge(DeterministicEngine(), "score-1-10").judge(items)])


# ------------------------------------------------------------------------------ disconnects
def test_a_disconnected_client_is_dropped_from_the_queue_and_never_judged():
    engine = DeterministicEngine()
    engine.hold()
    with serve(engine, max_wait_ms=0) as (server, client):
        blocker = in_thread(client.post, "/v1/judge/score", json={"items": [SCORE_ITEM]})
        assert engine.entered.wait(10)  # the engine is busy; the next request waits in the queue
        body = json.dumps({"items": [{"prompt": "p", "response": "abandoned by its client"}]}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(f"POST /v1/judge/score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: metric(client, "rlaif_queue_depth_items") == 1)
        sock.close()  # the client gives up
        wait_until(lambda: metric(client, "rlaif_queue_depth_items") == 0)  # ...and its item leaves the queue
        engine.release()
        blocker[0].join(10)
        assert blocker[1]["result"].status_code == 200
        assert client.post("/v1/judge/score", json={"items": [SCORE_ITEM]}).status_code == 200
        assert metric(client, "rlaif_requests_total", endpoint="/v1/judge/score", status="499") == 1
    assert not any("abandoned" in text for text in engine.judged)


# ------------------------------------------------------------------------------ event loop
def test_healthz_answers_fast_while_a_heavy_adversarial_request_is_processed():
    """Three fields of "<" + spaces took ~6 s each in the old regex, holding the GIL: /healthz hung 105 s.

    The bounds sit far from both sides: that bug stalls a probe for seconds (6 s per field), while a
    healthy server on a 2-core CI machine answers in ~3 ms per probe. One probe of one CI run took
    0.68 s (the old max bound was 0.5 s); what held it was not traced."""
    engine = DeterministicEngine(delay_s=1.5, context_length=None)  # in flight while /healthz is polled
    attack = "<" + " " * 31_999
    item = {"prompt": attack, "response_a": attack, "response_b": attack}
    with serve(engine, max_item_tokens=100_000) as (_, client):
        heavy = in_thread(client.post, "/v1/judge/pairwise", json={"items": [item]}, timeout=120)
        latencies = []
        with httpx.Client(base_url=str(client.base_url), timeout=30) as probe:
            while heavy[0].is_alive() and len(latencies) < 200:
                started = time.perf_counter()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)
        heavy[0].join(120)
        assert heavy[1]["result"].status_code == 200, heavy[1]
    assert len(latencies) >= 5, "the heavy request finished before /healthz could be probed"
    assert statistics.median(latencies) < 0.1, f"/healthz slow: median {statistics.median(latencies):.3f}s"
    assert max(latencies) < 2.0, f"/healthz stalled: {max(latencies):.2f}s"


# ------------------------------------------------------------------------------ auth and connections
def test_unauthenticated_requests_are_refused_before_the_body_is_read():
    with serve(api_keys="k-123") as (server, client):
        # Headers announce 15 MB that never come: the answer must not wait for them.
        started = time.perf_counter()
        reply = raw_request(server.port, "POST /v1/judge/score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                         "content-length: 15000000")
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        assert b"connection: close" in reply.lower() and time.perf_counter() - started < 3
        # an unknown path and malformed JSON without a key are 401 too (auth comes first, not 404/400)
        malformed = client.post("/v1/judge/score", content=b'{"items": [', headers={"content-type": "application/json"})
        assert malformed.status_code == 401 and error_of(malformed).code == "unauthorized"
        assert client.get("/no/such/path").status_code == 401
        keyed = client.post("/v1/judge/score", content=b'{"items": [',
                            headers={"content-type": "application/json", "authorization": "Bearer k-123"})
        assert keyed.status_code == 400 and error_of(keyed).code == "bad_request"
        assert client.get("/healthz").status_code == 200


def test_a_connection_trickling_its_headers_is_closed_after_header_timeout():
    with serve(header_timeout=0.5) as (server, client):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        started = time.perf_counter()
        closed_after = None
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.perf_counter() - started
        reply = read_reply(sock) if closed_after is None else b""
        closed_after = closed_after or time.perf_counter() - started
        sock.close()
        assert closed_after < 3, f"the slow connection was held for {closed_after:.1f}s"
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:100]
        # a silent connection is closed as well, and normal keep-alive requests still work
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
            assert silent.recv(100).startswith(b"HTTP/1.1 408")
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(0.2)


def test_a_slow_body_gets_408_after_body_timeout():
    with serve(body_timeout=0.5) as (server, _):
        started = time.perf_counter()
        reply = raw_request(server.port, "POST /v1/judge/score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                         "content-length: 1000", b'{"items": [')
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"code":"body_timeout"' in reply.replace(b" ", b"") and time.perf_counter() - started < 3


def test_connections_beyond_max_connections_get_503():
    with serve(max_connections=3) as (server, client):
        assert client.get("/healthz").status_code == 200  # `client` now holds one keep-alive connection
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        try:
            wait_until(lambda: len(server.server.server_state.connections) >= 3)
            with httpx.Client(base_url=server.url, timeout=5) as extra:
                assert extra.get("/healthz").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: len(server.server.server_state.connections) <= 1)
        assert client.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------ docs, ids, curl
@pytest.mark.parametrize("public_docs", [False, True])
def test_docs_need_the_key_unless_public_docs(public_docs):
    with serve(api_keys="k-123", public_docs=public_docs) as (_, client):
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == (200 if public_docs else 401), path
            assert client.get(path, headers={"authorization": "Bearer k-123"}).status_code == 200, path
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_an_unknown_rubric_id_is_not_echoed_whole():
    with serve() as (_, client):
        response = client.get("/v1/rubrics/" + "x" * 15_000)  # near h11's 16 KiB request-head cap
        assert response.status_code == 404
        message = error_of(response).message
        assert len(message) < 2_000 and "15000 characters" in message
    catalog = RubricCatalog.from_settings(ServiceSettings(cache=False))
    with pytest.raises(Exception) as info:
        catalog.detail("y" * 100_000)
    assert len(str(info.value)) < 2_000 and "100000 characters" in str(info.value)


def test_the_printed_curl_example_works_with_the_key_variable_the_service_reads():
    settings = ServiceSettings(cache=False, api_keys="first-key,second-key")
    with serve(api_keys="first-key,second-key") as (server, _):
        command = curl_example(server.url, settings)
        assert "first-key" not in command  # never prints a key
        env = {**os.environ, "RLAIF_API_KEYS": "first-key,second-key"}
        env.pop("RLAIF_API_KEY", None)
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env)
        assert len(json.loads(out.stdout)["judgments"]) == 1, out.stdout + out.stderr


def test_concurrent_unauthenticated_uploads_do_not_block_authenticated_work():
    """Many clients announcing large bodies without a key are answered from their headers alone."""
    with serve(api_keys="k-123") as (server, client):
        replies: list[bytes] = []

        def upload() -> None:
            replies.append(raw_request(server.port, "POST /get_reward HTTP/1.1\r\nhost: x\r\n"
                                                    "content-type: application/json\r\ncontent-length: 15000000"))

        threads = [threading.Thread(target=upload) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(replies) == 20 and all(reply.startswith(b"HTTP/1.1 401") for reply in replies)
        ok = client.post("/v1/judge/score", json={"items": [SCORE_ITEM]}, headers={"authorization": "Bearer k-123"})
        assert ok.status_code == 200
