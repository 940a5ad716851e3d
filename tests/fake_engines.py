"""Test doubles for the service tests: a deterministic engine, a toy reward scorer, a real-server harness.

`DeterministicEngine` implements the `rlaif.judge.engines.base.Engine` protocol exactly (same
signatures, same output shapes, unnormalized label log-probs with a label mass below 1) but
derives each label distribution from a hash of the prompt, so it is instant, reproducible, and
independent of which batch a prompt lands in (batched == unbatched, bit for bit). Its token
counts are the prompt's JSON length / 4, so tests can hit token budgets with plain text. It can be told to fail (`fail_next`), to fail only on a
marked input (`POISON`), to be slow (`delay_s`), or to block until released (`hold` /
`release`), which is how tests saturate the queue or catch a batch in flight. It is used for
routing, failure-injection and fuzz tests, in addition to (never instead of) the real-model
tests in `test_service.py`.

`serve(...)` starts an app with the deterministic engine on such a server and yields it with an
httpx client; `error_of`, `metric`, `in_thread` and `wait_until` are the helpers the service
tests share.

`ServerThread` runs a real uvicorn server for an app on a free 127.0.0.1 port in a thread, with
the same uvicorn settings `rlaif serve` uses (`rlaif.service.server.uvicorn_config`: header timeout,
connection cap, keep-alive timeout).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import numpy as np
import uvicorn

from rlaif.judge.engines.base import EngineError, GenerationParams
from rlaif.judge.types import ChatPrompt
from rlaif.service.app import create_app
from rlaif.service.protocol import ErrorResponse
from rlaif.service.settings import ServiceSettings

POISON = "<<poison>>"
"""Any prompt containing this text makes `DeterministicEngine` raise, whatever batch it is in."""


class DeterministicEngine:
    """Hash-derived label distributions; failure, delay and blocking on demand."""

    special_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")
    """What a ChatML tokenizer would report; rubric rendering defuses these in user text."""

    def __init__(self, *, delay_s: float = 0.0, context_length: int | None = 8192) -> None:
        self.delay_s = delay_s
        self.context_length = context_length
        self.batch_sizes: list[int] = []  # prompts per label_logprobs/generate call
        self.judged: list[str] = []  # every prompt's text, in the order the engine saw them
        self._lock = threading.Lock()
        self._failures_left = 0
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()  # set whenever a call starts (lets tests wait for "batch in flight")

    @property
    def engine_id(self) -> str:
        return "fake:deterministic"

    @property
    def model_name(self) -> str:
        return "deterministic-test-engine"

    # -- control
    def fail_next(self, calls: int = 1) -> None:
        with self._lock:
            self._failures_left = calls

    def hold(self) -> None:
        """Make the next calls block until `release()`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    # -- Engine protocol
    def label_logprobs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        self._enter(prompts)
        logits = np.array([[_unit(_text(p) + "\x00" + label) * 6.0 - 3.0 for label in labels] for p in prompts])
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)  # (N, L)
        mass = np.array([0.5 + 0.45 * _unit(_text(p) + "\x00mass") for p in prompts])  # (N,) in [0.5, 0.95)
        return np.log(probs * mass[:, None])  # (N, L), unnormalized like a real engine's

    def prompt_token_counts(self, prompts: Sequence[ChatPrompt]) -> list[int]:
        return [len(_text(p)) // 4 + 1 for p in prompts]

    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        self._enter(prompts)
        return [[f"rationale {hashlib.sha256((_text(p) + str(k)).encode()).hexdigest()[:12]}" for k in range(params.n)]
                for p in prompts]

    def _enter(self, prompts: Sequence[ChatPrompt]) -> None:
        self.entered.set()
        self._gate.wait(timeout=60)
        with self._lock:
            self.batch_sizes.append(len(prompts))
            self.judged.extend(_text(p) for p in prompts)
            failing = self._failures_left > 0
            if failing:
                self._failures_left -= 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if failing:
            raise EngineError("injected engine failure")
        if any(POISON in _text(p) for p in prompts):
            raise EngineError("poisoned input")


class LengthRewardScorer:
    """A toy reward model for routing tests: reward = len(response) / 10 - 1 (deterministic)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        assert len(prompts) == len(responses)
        self.calls.append(len(prompts))
        return [len(response) / 10.0 - 1.0 for response in responses]


def _text(prompt: ChatPrompt) -> str:
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _unit(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


class ServerThread:
    """Run `app` with a real uvicorn server on 127.0.0.1:<free port> in a background thread.

    `with ServerThread(app) as server: httpx.get(server.url + "/healthz")`. Exiting asks
    uvicorn to shut down gracefully (in-flight requests finish, then the lifespan shutdown runs).
    """

    def __init__(self, app, port: int | None = None, *, timeout_graceful_shutdown: float = 30.0) -> None:
        from rlaif.service.server import uvicorn_config
        from tests.conftest import free_port

        self.port = port or free_port()
        config = uvicorn_config(app, app.state.runtime.settings, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=timeout_graceful_shutdown)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start within 60 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "uvicorn did not shut down within 60 s"

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------ service test helpers
SCORE_ITEM = {"prompt": "What is 2+2?", "response": "4"}
PAIR_ITEM = {"prompt": "What is 2+2?", "response_a": "4", "response_b": "5"}


@contextlib.contextmanager
def serve(engine: DeterministicEngine | None = None, *, reward_model=None,
          **settings) -> Iterator[tuple[ServerThread, httpx.Client]]:
    """A real server for `create_app(ServiceSettings(**settings))` (cache off, 5 ms batching wait by default)."""
    options = {"cache": False, "max_wait_ms": 5.0} | settings
    app = create_app(ServiceSettings(**options), engine=engine or DeterministicEngine(), reward_model=reward_model)
    with ServerThread(app, timeout_graceful_shutdown=10) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield server, client


def error_of(response: httpx.Response) -> ErrorResponse:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = ErrorResponse.model_validate_json(response.content)
    assert body.status == response.status_code
    return body


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """Value of one sample in /metrics (0 if absent)."""
    text = client.get("/metrics").text
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"^([a-zA-Z_:]+)(\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(4))
    return 0.0


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Call `fn` on a daemon thread; its result (or exception) lands in the returned dict."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except Exception as exc:  # surfaced by the test's assertions
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
