"""The judge service with the real embedded model, over real HTTP (uvicorn on 127.0.0.1).

Every endpoint is called on a live server whose engine is the session's SmolLM2 engine, and
every judgment that comes back is checked against in-process judging of the same items with
the same engine (tolerance 1e-4): HTTP, JSON and the micro-batcher must not change a number.
The batching test fires concurrent requests and checks both that the engine saw batches of
more than one request (from /metrics) and that every caller got its own answer.
`rlaif serve` itself is started once as a subprocess to check its printed curl example works.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rlaif.judge.judges import PairwiseJudge, ScoreJudge
from rlaif.judge.types import PairwiseItem, ScoreItem
from rlaif.service.app import create_app
from rlaif.service.settings import ServiceSettings
from tests.conftest import free_port
from tests.fake_engines import ServerThread

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live(default_engine):
    """A real server on the real model. A generous max_wait makes coalescing deterministic."""
    app = create_app(ServiceSettings(cache=False, max_wait_ms=300, max_batch_size=16), engine=default_engine)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        yield client


def test_health_ready_docs_and_openapi(live):
    assert live.get("/healthz").json() == {"status": "ok"}
    ready = live.get("/readyz").json()
    assert ready["ready"] is True and ready["model"] == "SmolLM2-135M-Instruct"
    assert "swagger" in live.get("/docs").text.lower()
    paths = set(live.get("/openapi.json").json()["paths"])
    assert paths >= {"/v1/judge/pairwise", "/v1/judge/score", "/v1/rewards", "/get_reward", "/v1/rubrics",
                     "/v1/rubrics/{rubric_id}", "/healthz", "/readyz", "/metrics"}


def test_rubric_endpoints(live):
    rubrics = {r["id"]: r for r in live.get("/v1/rubrics").json()["rubrics"]}
    assert rubrics["helpfulness"]["default"] and rubrics["score-1-10"]["default"]
    assert rubrics["helpfulness-cot"]["modes"] == ["logprob", "cot"]
    detail = live.get("/v1/rubrics/score-1-10").json()
    assert detail["labels"] == [str(i) for i in range(1, 11)] and "{{ response }}" in detail["template"]


def test_pairwise_matches_in_process_judging(live, default_engine):
    items = [PairwiseItem(prompt="What is the capital of France?", response_a="Paris.", response_b="Berlin."),
             PairwiseItem(prompt="Say hello.", response_a="Hello!", response_b="No.")]
    response = live.post("/v1/judge/pairwise", json={"items": [i.model_dump() for i in items]})
    assert response.status_code == 200, response.text
    served = response.json()["judgments"]
    expected = PairwiseJudge(default_engine, "helpfulness").judge(items)
    for got, want in zip(served, expected):
        assert got["prob_a"] == pytest.approx(want.prob_a, abs=TOL)
        assert [o["prob_first"] for o in got["per_order"]] == pytest.approx([o.prob_first for o in want.per_order], abs=TOL)
        assert got["consistent"] == want.consistent and got["preference"] == want.preference.value
        assert got["engine"] == default_engine.engine_id and got["rubric_id"] == "helpfulness"


def test_concurrent_requests_are_batched_and_each_caller_gets_its_answer(live, default_engine):
    items = [ScoreItem(prompt=f"What is {i} + {i}?", response=f"It is {2 * i}.") for i in range(6)]

    async def fire():
        async with httpx.AsyncClient(base_url=str(live.base_url), timeout=600) as client:
            return await asyncio.gather(*(client.post("/v1/judge/score", json={"items": [item.model_dump()]})
                                          for item in items))

    before = _histogram(live, "rlaif_batch_size_requests", kind="score")
    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    expected = ScoreJudge(default_engine, "score-1-10").judge(items)
    for response, want in zip(responses, expected):
        got = response.json()["judgments"][0]
        assert got["score"] == pytest.approx(want.score, abs=TOL)
        assert got["distribution"] == pytest.approx(want.distribution, abs=TOL)
    after = _histogram(live, "rlaif_batch_size_requests", kind="score")
    batches = after["count"] - before["count"]
    single = after["le=1.0"] - before["le=1.0"]
    assert after["sum"] - before["sum"] == len(items)
    assert batches < len(items) and single < batches, f"no engine batch held more than one request: {after}"
    assert max(r.json()["judgments"][0]["timings"]["batch_size"] for r in responses) > 1


def test_rewards_score_and_pairwise_modes(live, default_engine):
    prompt = "Name a primary color."
    score_body = {"items": [{"prompt": prompt, "response": "Red."}], "mode": "score"}
    scored = live.post("/v1/rewards", json=score_body).json()
    want_score = ScoreJudge(default_engine, "score-1-10").judge([ScoreItem(prompt=prompt, response="Red.")])[0]
    assert scored["rewards"][0] == pytest.approx(want_score.score, abs=TOL)
    assert scored["details"][0]["score"]["label"] == want_score.label and scored["rubric_id"] == "score-1-10"

    pair_body = {"items": [{"prompt": prompt, "response": "Red.", "reference": "Banana."}], "mode": "pairwise",
                 "scale": "signed"}
    compared = live.post("/v1/rewards", json=pair_body).json()
    want_pair = PairwiseJudge(default_engine, "helpfulness").judge(
        [PairwiseItem(prompt=prompt, response_a="Red.", response_b="Banana.")])[0]
    assert compared["rewards"][0] == pytest.approx(2 * want_pair.prob_a - 1, abs=TOL)
    assert compared["model"] == default_engine.model_name


def test_openrlhf_get_reward_round_trip(live, default_engine, plain_checkpoint_dir):
    """What OpenRLHF sends: chat-templated prompts (SmolLM2's own template) and prompt + response + <|im_end|>
    queries, the second left-truncated. The rewards equal /v1/rewards and in-process judging of the plain
    (question, answer): the policy's template is not part of what the judge grades."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plain_checkpoint_dir)
    questions, answers = ["What is 3+3?", "Name an ocean."], ["6", "The Pacific Ocean."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    queries = [prompts[0] + answers[0] + "<|im_end|>", prompts[1][60:] + answers[1] + "<|im_end|>"]
    response = live.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": ["6", "Pacific"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    expected = ScoreJudge(default_engine, "score-1-10").judge(
        [ScoreItem(prompt=q, response=a) for q, a in zip(questions, answers)])
    assert body["rewards"] == pytest.approx([j.score for j in expected], abs=TOL)
    direct = live.post("/v1/rewards", json={"items": [{"prompt": q, "response": a} for q, a in zip(questions, answers)]})
    assert body["rewards"] == pytest.approx(direct.json()["rewards"], abs=TOL)
    assert body["scores"] == pytest.approx(body["rewards"])
    assert body["extra_logs"]["prefix_recovered"] == [0.0, 1.0]
    assert all(len(values) == 2 for values in body["extra_logs"].values())
    assert all(0.0 <= r <= 1.0 for r in body["rewards"])


def test_an_item_past_the_context_is_refused_before_the_engine(live, default_engine):
    """The real engine's context length sets the default item budget (SmolLM2: 8192 tokens)."""
    long = "lorem ipsum dolor sit amet " * 1500  # ~40k characters: far past 8,192 tokens
    response = live.post("/v1/judge/score", json={"items": [{"prompt": "Summarize.", "response": long[:32000]}]})
    assert response.status_code == 413, response.text
    assert f"max_item_tokens={default_engine.context_length}" in response.json()["message"]


@pytest.mark.slow
def test_rlaif_serve_prints_a_curl_example_that_works():
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLAIF_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "rlaif", "serve", "--port", str(port), "--no-cache",
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        command = _read_curl_line(proc, timeout=300)
        assert f"http://127.0.0.1:{port}/v1/judge/pairwise" in command
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
        judgments = httpx.Response(200, content=out.stdout.encode()).json()["judgments"]
        assert len(judgments) == 1 and 0.0 <= judgments[0]["prob_a"] <= 1.0
    finally:
        proc.send_signal(signal.SIGINT)  # graceful shutdown, as Ctrl-C would
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    stderr = proc.stderr.read() if proc.stderr else ""
    # uvicorn re-raises the captured SIGINT after its graceful shutdown: 130, the usual Ctrl-C status.
    assert code in (0, 130, -signal.SIGINT), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]


def _read_curl_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError(f"rlaif serve exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            continue
        if line.strip().startswith("curl "):
            shlex.split(line)  # it must be a well-formed shell command
            return line.strip()
    raise AssertionError("rlaif serve printed no curl example in time")


def _histogram(client: httpx.Client, name: str, **labels: str) -> dict[str, float]:
    """count, sum and the le="1.0" bucket of a labelled Prometheus histogram."""
    values = {"count": 0.0, "sum": 0.0, "le=1.0": 0.0}
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        for suffix, key in (("_count", "count"), ("_sum", "sum")):
            if line.startswith(f"{name}{suffix}{{{selector}}} "):
                values[key] = float(line.split()[-1])
        match = re.match(rf'{name}_bucket\{{(.*)\}} (\S+)$', line)
        if match and 'le="1.0"' in match.group(1) and selector in match.group(1):
            values["le=1.0"] = float(match.group(2))
    return values
