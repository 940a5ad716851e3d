"""OpenAIEngine against a real llama.cpp server, recorded real responses, and a real HTTP failure injector.

- Parsing is pinned on responses recorded from llama.cpp's server (`tests/data/openai_shapes/
  llamacpp_*.json`: chat shape, also returned on /v1/completions) and on two hand-written
  legacy-completions responses in the format of OpenAI's API reference.
- The live tests start llama.cpp (xllamacpp, in the dev extra) on 127.0.0.1 with the embedded
  Q4_1 GGUF and compare with `HFEngine` on the dequantized checkpoint of the same weights.
- Servers that misbehave (no logprobs, 503s, rejected prefill, auth) are a tiny real starlette
  app served by uvicorn on 127.0.0.1; it mimics those servers' answers, and its success
  answers are the recorded llama.cpp responses.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rlaif.judge.engines import build_engine
from rlaif.judge.engines.base import EngineError, GenerationParams, TopCandidate, label_distribution, label_probs
from rlaif.judge.engines.openai import (OpenAIEngine, label_log_scores, missing_label_floor, normalize_token,
                                  top_logprobs_at)
from rlaif.judge.judges import PairwiseJudge
from rlaif.judge.rubric import load_rubric
from rlaif.judge.types import PairwiseItem, Preference
from tests.llamacpp import MODEL_ALIAS, llamacpp_server_module  # noqa: F401 - pytest fixture

SHAPES = Path(__file__).parent / "data" / "openai_shapes"


def recorded(name: str) -> dict:
    return json.loads((SHAPES / f"{name}.json").read_text())["response"]


# --------------------------------------------------------------------------- parsing (recorded responses)
def texts(candidates) -> list[str]:
    return [c.text for c in candidates]


def lp(candidates) -> dict[str, float]:
    """{text: log-prob}, summing duplicates (several tokens may render the same text)."""
    out: dict[str, float] = {}
    for c in candidates:
        out[c.text] = float(np.logaddexp(out.get(c.text, -math.inf), c.logprob))
    return out


def ends(p_end: float) -> list[TopCandidate]:
    """A hand-built top-k after a label: the end of the reply with `p_end`, a word continuation otherwise."""
    return [TopCandidate(text="", logprob=math.log(p_end), special=True),
            TopCandidate(text="xyz", logprob=math.log(1 - p_end))]


def test_chat_shape_from_llamacpp():
    top = top_logprobs_at(recorded("llamacpp_chat_pairwise"))
    assert texts(top) == ["A", "The", "B", "You", "<"]
    assert top[0].logprob == pytest.approx(-1.341909646987915)


def test_chat_shape_on_completions_endpoint_from_llamacpp():
    top = top_logprobs_at(recorded("llamacpp_completions_pairwise"))
    assert lp(top)["B"] == pytest.approx(-1.9352, abs=1e-3)


def test_legacy_completions_shape():
    top = top_logprobs_at(recorded("openai_legacy_completions"))
    table = {"": top, "A": ends(0.5), "B": ends(0.9)}
    scores = label_log_scores(["A", "B"], lambda prefix: table[prefix])
    raw = {c.text: c.logprob for c in top}
    # " B" and "B" both normalize to label B: their probabilities add up, then the ending factor.
    assert scores[1] == pytest.approx(math.log(math.exp(raw[" B"]) + math.exp(raw["B"])) + math.log(0.9))
    assert scores[0] == pytest.approx(raw[" A"] + math.log(0.5))


def test_raw_bpe_tokens_are_normalized():
    top = top_logprobs_at(recorded("raw_bpe_legacy_completions"))
    table = {"": top, "7": ends(1 - 1e-9), "8": ends(1 - 1e-9)}
    scores = label_log_scores(["7", "8"], lambda prefix: table[prefix])
    assert scores[0] == pytest.approx(-1.2039728)
    assert scores[1] == pytest.approx(math.log(math.exp(-0.5108256) + math.exp(-3.5065579)))  # "Ġ8" + "8"


def test_end_of_turn_token_renders_as_empty_special_text():
    body = {"choices": [{"logprobs": {"content": [{"token": "A", "logprob": -0.1, "top_logprobs": [
        {"token": "", "logprob": -0.2}, {"token": ":", "logprob": -2.0}]}]}}]}
    first = top_logprobs_at(body)[0]
    assert first.special and first.text == ""


@pytest.mark.parametrize("token, at_start, expected", [
    ("A", True, "A"),          # plain
    (" A", True, "A"),         # leading space at the start of the answer is dropped
    ("ĠA", True, "A"),         # byte-level BPE space marker
    ("▁A", True, "A"),         # SentencePiece space marker
    ("\n", True, ""),          # whitespace-only tokens carry no label text
    (" 0", False, " 0"),       # after a prefix the space is kept: "1" + " 0" is not "10"
    ("Ġ0", False, " 0"),
    ("0", False, "0"),
])
def test_normalize_token(token, at_start, expected):
    assert normalize_token(token, at_start=at_start) == expected


def test_multi_token_label_follows_recorded_prefill():
    """Score labels 1..10 from a recorded first-token answer and the recorded follow-up after "1"."""
    first, after_one = top_logprobs_at(recorded("llamacpp_chat_score")), top_logprobs_at(recorded("llamacpp_chat_score_prefill_1"))
    calls: list[str] = []

    def fetch(prefix: str):
        calls.append(prefix)
        return {"": first, "1": after_one}.get(prefix) or ends(0.8)

    labels = [str(i) for i in range(1, 11)]
    scores = label_log_scores(labels, fetch)
    top0, top1 = lp(first), lp(after_one)
    shown = [label for label in labels[:9] if label in top0]
    assert calls[:2] == ["", "1"] and sorted(calls[2:]) == sorted({*shown[1:], "10"})
    # "1": its token, then the ending tokens shown after it ("0" is not one: it spells "10").
    end_after_one = sum(math.exp(v) for t, v in top1.items() if t == "" or not (t[0].isalnum() or t[0] in "_\ufffd"))
    assert scores[0] == pytest.approx(top0["1"] + math.log(end_after_one))
    assert scores[9] == pytest.approx(top0["1"] + top1["0"] + math.log(0.8))
    floor = missing_label_floor(list(top0.values()))
    for k, label in enumerate(labels[:9]):
        if label not in top0:
            assert scores[k] == pytest.approx(floor)
        elif label != "1":
            assert scores[k] == pytest.approx(top0[label] + math.log(0.8))


def test_missing_label_floor_is_below_everything_returned():
    assert missing_label_floor([-0.1, -2.0, -5.0]) == pytest.approx(-5.0 - math.log(2))
    # When the returned tokens already hold almost all the mass, the leftover bounds the floor.
    assert missing_label_floor([math.log(0.99), math.log(0.0099)]) == pytest.approx(math.log(1e-4) - math.log(2))


def test_response_without_logprobs_is_an_error():
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "finish_reason": "length"}]}
    with pytest.raises(EngineError, match="no logprobs"):
        top_logprobs_at(body)


# --------------------------------------------------------------------------- live llama.cpp server
@pytest.fixture(scope="module")
def pair_prompts():
    rubric = load_rubric("helpfulness")
    return [rubric.render(prompt="What is the capital of France?", response_a="The capital of France is Paris.",
                          response_b="I think it is Berlin."),
            rubric.render(prompt="What is the capital of France?", response_a="I think it is Berlin.",
                          response_b="The capital of France is Paris."),
            rubric.render(prompt="Say hello politely.", response_a="Hello! How can I help you today?",
                          response_b="What do you want?"),
            rubric.render(prompt="What is 3 times 4?", response_a="12", response_b="3 times 4 is 7.")]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_label_logprobs_live_agree_with_hf(llamacpp_server_module, default_engine, pair_prompts, endpoint):
    """Same weights (Q4_1 in llama.cpp, dequantized fp32 in transformers), same label semantics."""
    with OpenAIEngine(llamacpp_server_module.base_url, MODEL_ALIAS, endpoint=endpoint) as engine:
        got = label_distribution(engine.label_logprobs(pair_prompts, ["A", "B"]))
    hf = label_distribution(default_engine.label_logprobs(pair_prompts, ["A", "B"]))
    assert got.probs.shape == (len(pair_prompts), 2)
    assert np.abs(got.probs - hf.probs).max() < 0.15, (got.probs, hf.probs)
    assert np.abs(got.mass - hf.mass).max() < 0.15, (got.mass, hf.mass)
    decisive = np.abs(hf.probs[:, 0] - 0.5) > 0.05
    assert np.array_equal(got.probs[decisive].argmax(axis=1), hf.probs[decisive].argmax(axis=1))


def test_multi_token_labels_live(llamacpp_server_module, default_engine):
    """A judge certain of "10" scores 10 on both engines (the old definition folded it onto "1")."""
    rubric = load_rubric("score-1-10")
    few_shot = []
    for k in range(3):
        few_shot += [{"role": "user", "content": f"Rate this answer from 1 to 10: 'perfect answer {k}'"},
                     {"role": "assistant", "content": "10"}]
    prompts = [rubric.render(prompt="What is 2+2?", response="2+2 equals 4."),
               few_shot + [{"role": "user", "content": "Rate this answer from 1 to 10: 'perfect answer'"}]]
    results = {}
    for endpoint in ("chat", "completions"):
        with OpenAIEngine(llamacpp_server_module.base_url, MODEL_ALIAS, endpoint=endpoint) as engine:
            results[endpoint] = label_probs(engine, prompts, rubric.labels)
    hf = label_probs(default_engine, prompts, rubric.labels)
    for endpoint, got in results.items():
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
        assert int(got[1].argmax()) == 9 and float(got[1] @ np.arange(1, 11)) > 9.0, (endpoint, got[1])
        assert np.abs(got - hf).max() < 0.15, (endpoint, got, hf)
    # Both endpoints send the same text to the same server.
    np.testing.assert_allclose(results["chat"], results["completions"], atol=0.05)


def test_generate_live(llamacpp_server_module):
    engine = OpenAIEngine(llamacpp_server_module.base_url, MODEL_ALIAS)
    prompts = [[{"role": "user", "content": "What is the capital of France? One sentence."}],
               [{"role": "user", "content": "Name one color."}]]
    greedy = engine.generate(prompts, GenerationParams(max_new_tokens=16))
    assert [len(t) for t in greedy] == [1, 1] and all(t[0] for t in greedy)
    assert "Paris" in greedy[0][0]
    assert greedy == engine.generate(prompts, GenerationParams(max_new_tokens=16))
    sampled = engine.generate(prompts[:1], GenerationParams(max_new_tokens=8, temperature=0.9, n=3, seed=5))
    assert len(sampled[0]) == 3
    stopped = engine.generate(prompts[:1], GenerationParams(max_new_tokens=16, stop=("Paris",)))
    assert "Paris" not in stopped[0][0]
    with pytest.raises(EngineError, match="temperature"):
        engine.generate(prompts, GenerationParams(n=2))


def test_pairwise_judge_end_to_end_through_spec(llamacpp_server_module):
    spec = f"openai:{llamacpp_server_module.base_url}#{MODEL_ALIAS}"
    engine = build_engine(spec)
    assert engine.engine_id.startswith(spec + "#")
    assert engine.concurrency == 1, "llama.cpp reports one slot in /props: one request at a time by default"
    assert engine.context_length == 4096
    items = [PairwiseItem(prompt="What is the capital of France?", response_a="Paris.",
                          response_b="I am not sure, maybe Lyon."),
             PairwiseItem(prompt="Say hi.", response_a="Hi!", response_b="Hello there!")]
    judgments = PairwiseJudge(engine, "helpfulness").judge(items)
    assert len(judgments) == 2
    for judgment in judgments:
        assert 0.0 <= judgment.prob_a <= 1.0 and judgment.engine == engine.engine_id and judgment.model == MODEL_ALIAS
        assert 0.0 < judgment.label_mass <= 1.0
        assert [o.order for o in judgment.per_order] == ["ab", "ba"]
        assert judgment.preference in set(Preference)


# --------------------------------------------------------------------------- misbehaving servers (real HTTP)
Reply = tuple[int, dict, dict]  # (status, JSON body, headers)


class MimicServer:
    """A real HTTP server on 127.0.0.1 whose /v1/chat/completions answers come from `respond(body)`."""

    def __init__(self) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.respond: Callable[[dict], Reply] = lambda body: (500, {"error": "not scripted"}, {})

        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            status, payload, headers = await run_in_threadpool(self.respond, body)  # replies may overlap
            return JSONResponse(payload, status_code=status, headers=headers)

        app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with `replies` in order (then 500s)."""
        queue = list(replies)
        self.respond = lambda body: queue.pop(0) if queue else (500, {"error": "script exhausted"}, {})

    def __enter__(self) -> MimicServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("mimic server did not start")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture()
def mimic() -> Iterator[MimicServer]:
    with MimicServer() as server:
        yield server


NO_LOGPROBS = {"object": "chat.completion", "model": "m",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "finish_reason": "length"}]}
ONE_PROMPT = [[{"role": "user", "content": "A or B?"}]]
END_REPLY = {"object": "chat.completion", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {
    "role": "assistant", "content": ""}, "logprobs": {"content": [{"token": "", "logprob": -0.1, "top_logprobs": [
        {"token": "", "logprob": math.log(0.9)}, {"token": "pple", "logprob": math.log(0.1)}]}]}}]}
"""What the mimic answers to a continuation after a label: the reply ends there with P = 0.9."""


def is_continuation(body: dict) -> bool:
    return body.get("continue_final_message") is True


def pairwise_then_endings(first: dict) -> Callable[[dict], Reply]:
    return lambda body: (200, END_REPLY if is_continuation(body) else first, {})


def expected_pairwise(first: dict) -> np.ndarray:
    top = lp(top_logprobs_at(first))
    scores = np.array([top["A"], top["B"]]) + math.log(0.9)
    return label_distribution(scores[None, :]).probs[0]


def test_server_without_logprobs_raises_clear_error(mimic):
    mimic.respond = lambda body: (200, NO_LOGPROBS, {})
    engine = OpenAIEngine(mimic.base_url, "m", max_retries=0)
    with pytest.raises(EngineError, match="returned no logprobs"):
        engine.label_logprobs(ONE_PROMPT, ["A", "B"])
    assert mimic.requests[0]["logprobs"] is True and mimic.requests[0]["top_logprobs"] == 20
    assert mimic.requests[0]["max_tokens"] == 2


def test_label_ending_is_read_from_continuations(mimic):
    first = recorded("llamacpp_chat_pairwise")
    mimic.respond = pairwise_then_endings(first)
    engine = OpenAIEngine(mimic.base_url, "m", max_retries=0)
    got = label_distribution(engine.label_logprobs(ONE_PROMPT, ["A", "B"]))
    np.testing.assert_allclose(got.probs[0], expected_pairwise(first), atol=1e-9)
    top = lp(top_logprobs_at(first))
    assert got.mass[0] == pytest.approx((math.exp(top["A"]) + math.exp(top["B"])) * 0.9)
    follow_ups = [b["messages"][-1] for b in mimic.requests if is_continuation(b)]
    assert sorted(m["content"] for m in follow_ups) == ["A", "B"] and all(m["role"] == "assistant" for m in follow_ups)


def test_greedy_second_position_saves_a_follow_up(mimic):
    """max_tokens=2: the top-k after the greedy first token is the ending check of that label, for free."""
    first = json.loads(json.dumps(recorded("llamacpp_chat_pairwise")))
    content = first["choices"][0]["logprobs"]["content"]
    content.append({"token": ":", "logprob": -0.2, "top_logprobs": [{"token": ":", "logprob": math.log(0.7)},
                                                                     {"token": "pple", "logprob": math.log(0.3)}]})
    assert content[0]["token"] == "A"
    mimic.respond = pairwise_then_endings(first)
    engine = OpenAIEngine(mimic.base_url, "m", max_retries=0)
    scores = engine.label_logprobs(ONE_PROMPT, ["A", "B"])[0]
    assert [b["messages"][-1]["content"] for b in mimic.requests if is_continuation(b)] == ["B"]
    top = lp(top_logprobs_at(first))
    assert scores[0] == pytest.approx(top["A"] + math.log(0.7))  # ":" ends "A", "pple" does not


def test_retries_5xx_and_429_then_succeeds(mimic):
    first = recorded("llamacpp_chat_pairwise")
    replies = [(503, {"error": "busy"}, {"Retry-After": "0"}), (429, {"error": "slow down"}, {})]
    mimic.respond = lambda body: replies.pop(0) if replies else pairwise_then_endings(first)(body)
    engine = OpenAIEngine(mimic.base_url, "m", max_retries=2, backoff_seconds=0.01)
    probs = label_probs(engine, ONE_PROMPT, ["A", "B"])
    assert len(mimic.requests) == 5  # 2 failures, the first-token request, 2 continuations
    np.testing.assert_allclose(probs[0], expected_pairwise(first), atol=1e-9)


def test_gives_up_after_max_retries(mimic):
    mimic.respond = lambda body: (502, {"error": "bad gateway"}, {})
    engine = OpenAIEngine(mimic.base_url, "m", max_retries=1, backoff_seconds=0.01)
    with pytest.raises(EngineError, match="after 2 attempt"):
        engine.label_logprobs(ONE_PROMPT, ["A", "B"])
    assert len(mimic.requests) == 2


def test_timeout_names_the_knob(mimic):
    mimic.respond = lambda body: (time.sleep(1.0), (200, recorded("llamacpp_chat_pairwise"), {}))[1]
    engine = OpenAIEngine(mimic.base_url, "m", timeout=0.2, max_retries=0)
    with pytest.raises(EngineError, match=r"timeout=0.2 s.*\?timeout=600&concurrency=1"):
        engine.label_logprobs(ONE_PROMPT, ["A", "B"])


def test_client_errors_are_not_retried(mimic):
    mimic.respond = lambda body: (400, {"error": {"message": "bad request"}}, {})
    engine = OpenAIEngine(mimic.base_url, "m", max_retries=3, backoff_seconds=0.01)
    with pytest.raises(EngineError, match="HTTP 400"):
        engine.generate([[{"role": "user", "content": "hi"}]], GenerationParams(max_new_tokens=4))
    assert len(mimic.requests) == 1


REFUSED = (400, {"error": {"message": "Unrecognized request argument: continue_final_message"}}, {})


def test_server_that_refuses_assistant_prefill(mimic):
    """A hosted-API-like server: single-token labels work (ending unseen: P(end) = 1); '1'..'10' cannot."""
    first = recorded("llamacpp_chat_pairwise")
    mimic.respond = lambda body: REFUSED if is_continuation(body) else (200, first, {})
    engine = OpenAIEngine(mimic.base_url, "m", max_retries=0)
    top = lp(top_logprobs_at(first))
    np.testing.assert_allclose(engine.label_logprobs(ONE_PROMPT, ["A", "B"])[0], [top["A"], top["B"]])
    mimic.respond = lambda body: REFUSED if is_continuation(body) else (200, recorded("llamacpp_chat_score"), {})
    with pytest.raises(EngineError, match="prefix of another label|spans several tokens"):
        engine.label_logprobs([[{"role": "user", "content": "Rate 1-10"}]], [str(i) for i in range(1, 11)])


def test_api_key_from_environment(mimic, monkeypatch):
    mimic.respond = pairwise_then_endings(recorded("llamacpp_chat_pairwise"))
    monkeypatch.setenv("RLAIF_TEST_KEY", "s3cret")
    engine = OpenAIEngine(mimic.base_url, "m", api_key_env="RLAIF_TEST_KEY")
    engine.label_logprobs(ONE_PROMPT, ["A", "B"])
    assert all(h["authorization"] == "Bearer s3cret" for h in mimic.headers)
    monkeypatch.delenv("RLAIF_TEST_KEY")
    with pytest.raises(EngineError, match="RLAIF_TEST_KEY"):
        OpenAIEngine(mimic.base_url, "m", api_key_env="RLAIF_TEST_KEY")


def test_concurrent_requests_keep_prompt_order(mimic):
    """Answers to concurrent requests finish in any order; rows must still line up with prompts."""
    a_likely = recorded("llamacpp_chat_pairwise")
    b_likely = json.loads(json.dumps(a_likely))
    top = b_likely["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    top[0]["token"], top[2]["token"] = "B", "A"  # same numbers, letters swapped

    def respond(body: dict) -> Reply:
        if is_continuation(body):
            return 200, END_REPLY, {}
        index = int(body["messages"][0]["content"].removeprefix("q"))
        time.sleep(0.05 * (7 - index))  # later prompts answer sooner
        return 200, (a_likely if index % 3 == 0 else b_likely), {}

    mimic.respond = respond
    engine = OpenAIEngine(mimic.base_url, "m", concurrency=8)
    probs = label_probs(engine, [[{"role": "user", "content": f"q{i}"}] for i in range(8)], ["A", "B"])
    assert [int(p.argmax()) for p in probs] == [0 if i % 3 == 0 else 1 for i in range(8)]
