"""`OpenAIEngine`: judge and generate through any OpenAI-compatible HTTP server.

One engine for `vllm serve`, llama.cpp's server, SGLang and hosted APIs. The judge needs
label probabilities, which such servers expose only as the top-k log-probs of each
generated token, so `label_probs` is built on those:

- **Request.** `max_tokens=1` at temperature 0 with `logprobs`: on `/chat/completions`
  `logprobs=true, top_logprobs=k`; on `/completions` the legacy integer `logprobs=k`.
- **Two response shapes are parsed.** The chat shape
  `choices[0].logprobs.content[0].top_logprobs = [{"token", "logprob"}, ...]` (which llama.cpp
  also returns on `/v1/completions`) and the legacy completions shape
  `choices[0].logprobs.top_logprobs[0] = {token: logprob}` (OpenAI, vLLM).
- **Tokens are matched to labels as text**, because the client has no tokenizer. At the start
  of the answer a token's leading whitespace and byte-level/SentencePiece space markers (`Ġ`,
  `▁`) are dropped, so "A", " A" and "ĠA" all count for label "A", and several tokens that
  normalize to the same text have their probabilities summed. A token counts only if it is
  the label or a proper prefix of it ("A." does not count for "A"), which mirrors `HFEngine`:
  a label's probability is that of its tokens, with nothing required after them.
- **Multi-token labels** ("10" is "1" + "0" for SmolLM2) are followed token by token: when a
  returned token is a proper prefix of a label, a follow-up request continues the answer from
  that prefix and reads the next token's top-k. On `/completions` the prefix is appended to
  the prompt text; on `/chat/completions` it is sent as a final assistant message with
  `continue_final_message=true, add_generation_prompt=false` (vLLM's documented prefill
  switches; llama.cpp continues a final assistant message by default). A server that rejects
  these fields (e.g. OpenAI's hosted API) raises `EngineError` saying to use single-token
  labels or `endpoint="completions"`. Single-token label sets never need follow-ups.
- **A label missing from the top-k** gets a floor log-prob: the smaller of the lowest returned
  log-prob and log(1 - returned mass), minus ln 2, i.e. at most half of what the missing
  token could possibly have. The row is then normalized over the label set as usual, so a
  label that never shows up ends up clearly below every label that does.
- **A server that returns no logprobs** raises `EngineError` (we never fall back to parsing
  the generated text: a hard label is not a soft label).

The protocol is synchronous; requests run concurrently on a bounded thread pool over one
`httpx.Client`, and 429/5xx/connection errors are retried with exponential backoff
(honouring `Retry-After`). Other 4xx errors fail at once with the server's message.

`/completions` needs the chat template applied on our side: from the HF tokenizer named by
`tokenizer=` (id or path), or, by default, from the server's `/apply-template` route
(llama.cpp).
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import numpy as np

from judge.engines.base import EngineError, GenerationParams, normalize_log_probs
from judge.types import ChatPrompt

Endpoint = Literal["chat", "completions"]
TopLogprobs = list[tuple[str, float]]
"""Top-k candidates for one position: (token text as the server returns it, log-prob)."""

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_SPACE_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"}
_MAX_BACKOFF_SECONDS = 30.0


# ---------------------------------------------------------------------------------------- parsing
def top_logprobs_at(body: Mapping[str, Any], position: int = 0) -> TopLogprobs:
    """Top-k (token, log-prob) of generated token `position` from a (chat or legacy) response.

    Raises `EngineError` when the response carries no log-probs at all.
    """
    choices = body.get("choices")
    if not choices:
        raise EngineError(f"server response has no choices: {_preview(body)}")
    logprobs = choices[0].get("logprobs")
    if not logprobs:
        raise EngineError("the server returned no logprobs; label probabilities need a server that supports "
                          "`logprobs`/`top_logprobs` (vLLM, llama.cpp server, OpenAI chat models)")
    content = logprobs.get("content")
    if content is not None:  # chat shape (also llama.cpp's /v1/completions)
        if len(content) <= position or not content[position].get("top_logprobs"):
            raise EngineError(f"the server returned no top_logprobs for token {position}: {_preview(logprobs)}")
        return [(str(entry["token"]), float(entry["logprob"])) for entry in content[position]["top_logprobs"]]
    top = logprobs.get("top_logprobs")  # legacy completions shape
    if not top or len(top) <= position or not top[position]:
        raise EngineError(f"the server returned no top_logprobs for token {position}: {_preview(logprobs)}")
    return [(str(token), float(logprob)) for token, logprob in top[position].items()]


def normalize_token(token: str, *, at_start: bool) -> str:
    """Token text as it reads in the answer. At the start, leading whitespace is dropped."""
    text = "".join(_SPACE_MARKERS.get(char, char) for char in token)
    return text.lstrip() if at_start else text


def missing_label_floor(log_probs: Sequence[float]) -> float:
    """Log-prob assigned to a label absent from the returned top-k (see module docstring)."""
    lowest = min(log_probs)
    leftover = 1.0 - sum(math.exp(lp) for lp in log_probs)
    bound = min(lowest, math.log(leftover)) if leftover > 1e-12 else lowest
    return bound - math.log(2.0)


def label_log_scores(labels: Sequence[str], fetch: Callable[[str], TopLogprobs]) -> np.ndarray:
    """Unnormalized log-prob of each label being the answer's first text. (L,)

    `fetch(prefix)` returns the top-k of the next token after the answer has started with
    `prefix` ("" for the first token). It is called once per distinct prefix that some label
    continues past; single-token labels need only `fetch("")`.
    """
    targets = [label.strip() for label in labels]
    if any(not target for target in targets):
        raise EngineError(f"labels must contain non-whitespace text, got {list(labels)!r}")
    memo: dict[str, TopLogprobs] = {}

    def top(prefix: str) -> TopLogprobs:
        if prefix not in memo:
            memo[prefix] = fetch(prefix)
        return memo[prefix]

    def score(target: str, prefix: str) -> float:
        candidates = top(prefix)
        complete = -math.inf
        children: dict[str, float] = {}
        for token, logprob in candidates:
            piece = normalize_token(token, at_start=not prefix)
            if not piece:
                continue
            text = prefix + piece
            if text == target:
                complete = float(np.logaddexp(complete, logprob))
            elif target.startswith(text):
                children[text] = float(np.logaddexp(children.get(text, -math.inf), logprob))
        if complete == -math.inf and not children:
            return missing_label_floor([lp for _, lp in candidates])
        total = complete
        for child, logprob in children.items():
            total = float(np.logaddexp(total, logprob + score(target, child)))
        return total

    return np.array([score(target, "") for target in targets], dtype=np.float64)


def _preview(value: object, chars: int = 300) -> str:
    text = str(value)
    return text if len(text) <= chars else text[:chars] + "..."


# ---------------------------------------------------------------------------------------- engine
class OpenAIEngine:
    """Engine over an OpenAI-compatible HTTP API. Thread-safe; close() (or `with`) releases connections."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 timeout: float = 60.0, max_retries: int = 2, concurrency: int = 8, endpoint: Endpoint = "chat",
                 top_logprobs: int = 20, tokenizer: str | None = None, extra_body: Mapping[str, Any] | None = None,
                 backoff_seconds: float = 0.5) -> None:
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
        # Engine specs ("openai:URL#model?top_logprobs=5") may hand numbers over as strings.
        timeout, max_retries, concurrency = float(timeout), int(max_retries), int(concurrency)
        top_logprobs, backoff_seconds = int(top_logprobs), float(backoff_seconds)
        if concurrency < 1 or max_retries < 0 or top_logprobs < 1:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and top_logprobs >= 1")
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise EngineError(f"api_key_env={api_key_env!r} names an environment variable that is not set")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint: Endpoint = endpoint
        self.top_logprobs = top_logprobs
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff_seconds = backoff_seconds
        self.extra_body = dict(extra_body or {})
        self._tokenizer_name = tokenizer
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=concurrency,
                                                        max_keepalive_connections=concurrency))

    @property
    def engine_id(self) -> str:
        return f"openai:{self.base_url}#{self.model}"

    @property
    def model_name(self) -> str:
        return self.model

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ label_probs
    def label_probs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, len(labels)))
        rows = self._map(lambda prompt: self._label_scores(prompt, labels), list(prompts))
        return normalize_log_probs(np.stack(rows))  # (N, L)

    def _label_scores(self, prompt: ChatPrompt, labels: Sequence[str]) -> np.ndarray:
        prompt_text = self._render(prompt) if self.endpoint == "completions" else None
        return label_log_scores(labels, lambda prefix: self._next_token_top(prompt, prompt_text, prefix))

    def _next_token_top(self, prompt: ChatPrompt, prompt_text: str | None, prefix: str) -> TopLogprobs:
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if self.endpoint == "completions":
            assert prompt_text is not None
            body.update(prompt=prompt_text + prefix, logprobs=self.top_logprobs)
            return top_logprobs_at(self._post("/completions", body))
        body.update(logprobs=True, top_logprobs=self.top_logprobs)
        if not prefix:
            body["messages"] = prompt
            return top_logprobs_at(self._post("/chat/completions", body))
        body.update(messages=[*prompt, {"role": "assistant", "content": prefix}],
                    continue_final_message=True, add_generation_prompt=False)
        try:
            return top_logprobs_at(self._post("/chat/completions", body))
        except _ClientError as exc:
            raise EngineError(
                f"{self.engine_id}: multi-token labels need the server to continue an assistant prefix "
                f"({prefix!r}) and it refused ({exc}); use single-token labels or endpoint='completions'") from exc

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        """`params.n` completions per prompt, one request each.

        llama.cpp's server only accepts n=1, so samples are always separate requests; with a
        seed, sample i uses seed + i (same seed -> same texts on servers that honour seeds).
        """
        if params.n > 1 and params.temperature == 0:
            raise EngineError("n > 1 needs temperature > 0 (greedy decoding would repeat the same text)")
        jobs = [(prompt, i) for prompt in prompts for i in range(params.n)]
        texts = self._map(lambda job: self._generate_one(job[0], params, job[1]), jobs)
        return [texts[k * params.n:(k + 1) * params.n] for k in range(len(prompts))]

    def _generate_one(self, prompt: ChatPrompt, params: GenerationParams, sample: int) -> str:
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed + sample
        if params.stop:
            body["stop"] = list(params.stop)
        if self.endpoint == "completions":
            body["prompt"] = self._render(prompt)
            choice = self._post("/completions", body)["choices"][0]
            text = choice.get("text")
        else:
            body["messages"] = prompt
            choice = self._post("/chat/completions", body)["choices"][0]
            text = (choice.get("message") or {}).get("content")
        return (text or "").strip()

    # ------------------------------------------------------------------ plumbing
    def _map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)),
                                thread_name_prefix="openai-engine") as pool:
            return list(pool.map(fn, items))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on 429/5xx/connection errors; other 4xx raise `_ClientError` at once."""
        url = self.base_url + path
        payload = {**body, **self.extra_body}
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.post(url, json=payload)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise EngineError(f"{url} returned invalid JSON: {_preview(response.text)}") from exc
                failure = f"HTTP {response.status_code}: {_preview(response.text)}"
                if response.status_code not in _RETRY_STATUS:
                    raise _ClientError(f"{url} -> {failure}")
                retry_after = _retry_after_seconds(response)
            if attempt == self.max_retries:
                raise EngineError(f"{url} failed after {attempt + 1} attempt(s): {failure}")
            delay = retry_after if retry_after is not None else self.backoff_seconds * 2 ** attempt
            time.sleep(min(delay, _MAX_BACKOFF_SECONDS) * random.uniform(1.0, 1.1))
        raise AssertionError("unreachable")

    def _render(self, prompt: ChatPrompt) -> str:
        """Chat template applied client-side, for the /completions endpoint."""
        if self._tokenizer_name is not None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
            return self._tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        root = self.base_url.removesuffix("/v1")
        try:
            response = self._client.post(f"{root}/apply-template", json={"messages": prompt})
        except httpx.TransportError as exc:
            raise EngineError(f"{root}/apply-template unreachable: {exc}") from exc
        if response.status_code != 200 or "prompt" not in response.json():
            raise EngineError(f"endpoint='completions' needs the chat template: the server has no /apply-template "
                              f"(HTTP {response.status_code}); pass tokenizer=<HF model id or path>")
        return str(response.json()["prompt"])


class _ClientError(EngineError):
    """A non-retryable 4xx answer (bad request, auth, unsupported parameter)."""


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to exponential backoff
