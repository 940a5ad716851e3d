"""Test doubles for the service tests: a deterministic engine, a toy reward scorer, a real-server harness.

`DeterministicEngine` implements the `judge.engines.base.Engine` protocol exactly (same
signatures, same output shapes) but derives each label distribution from a hash of the
prompt, so it is instant, reproducible, and independent of which batch a prompt lands in
(batched == unbatched, bit for bit). It can be told to fail (`fail_next`), to fail only on a
marked input (`POISON`), to be slow (`delay_s`), or to block until released (`hold` /
`release`), which is how tests saturate the queue or catch a batch in flight. It is used for
routing, failure-injection and fuzz tests, in addition to (never instead of) the real-model
tests in `test_service.py`.

`ServerThread` runs a real uvicorn server for an app on a free 127.0.0.1 port in a thread.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Sequence

import numpy as np
import uvicorn

from judge.engines.base import EngineError, GenerationParams
from judge.types import ChatPrompt

POISON = "<<poison>>"
"""Any prompt containing this text makes `DeterministicEngine` raise, whatever batch it is in."""


class DeterministicEngine:
    """Hash-derived label distributions; failure, delay and blocking on demand."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []  # prompts per label_probs/generate call
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
    def label_probs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        self._enter(prompts)
        logits = np.array([[_unit(_text(p) + "\x00" + label) * 6.0 - 3.0 for label in labels] for p in prompts])
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return probs / probs.sum(axis=1, keepdims=True)  # (N, L)

    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        self._enter(prompts)
        return [[f"rationale {hashlib.sha256((_text(p) + str(k)).encode()).hexdigest()[:12]}" for k in range(params.n)]
                for p in prompts]

    def _enter(self, prompts: Sequence[ChatPrompt]) -> None:
        self.entered.set()
        self._gate.wait(timeout=60)
        with self._lock:
            self.batch_sizes.append(len(prompts))
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
        from tests.conftest import free_port

        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
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
