"""`OpenAIEngine`: judge and generate through any OpenAI-compatible HTTP server.

One engine for `vllm serve`, llama.cpp's server, SGLang and hosted APIs. The judge needs
log P(the reply is exactly the label) (`rlaif.judge.engines.base`), which such servers expose only as
the top-k log-probs of each generated token, so `label_logprobs` is built on those:

- **Request.** `max_tokens=2` at temperature 0 with `logprobs`: on `/chat/completions`
  `logprobs=true, top_logprobs=k`; on `/completions` the legacy integer `logprobs=k`. The first
  position's top-k gives the label tokens; the second position's top-k (conditioned on the greedy
  first token) gives, for free, the ending check of the label the judge actually chose.
- **Two response shapes are parsed.** The chat shape
  `choices[0].logprobs.content[i].top_logprobs = [{"token", "logprob"}, ...]` (which llama.cpp
  also returns on `/v1/completions`) and the legacy completions shape
  `choices[0].logprobs.top_logprobs[i] = {token: logprob}` (OpenAI, vLLM).
- **Tokens are matched to labels as text**, because the client has no tokenizer. At the start
  of the answer a token's leading whitespace and byte-level/SentencePiece space markers (`Ġ`,
  `▁`) are dropped, so "A", " A" and "ĠA" all count for label "A", and several tokens that
  normalize to the same text have their probabilities summed.
- **Continuations.** A label needs the top-k *after* it (does the next token end the label?), and
  a multi-token label ("10" is "1" + "0" for SmolLM2) needs the top-k after each of its proper
  prefixes. Those come from follow-up requests that continue the answer from the prefix: on
  `/completions` the prefix is appended to the prompt text; on `/chat/completions` it is sent as a
  final assistant message with `continue_final_message=true, add_generation_prompt=false` (vLLM's
  documented prefill switches; llama.cpp continues a final assistant message by default). A
  prompt's follow-ups run one after another in the same worker, so llama.cpp serves them from the
  slot that just cached the prompt.
- **What a server cannot show.** The ending check sums the ending tokens *in the top-k*; ending
  tokens outside it are unseen, so P(exact label) is a lower bound (off by at most the top-k's
  missing mass, ~0 for a judge that answers with a label). A label token missing from the top-k
  gets the floor log-prob of `rlaif.judge.engines.base.missing_label_floor`. A server that refuses to
  continue a reply (e.g. OpenAI's hosted API) shows only the first token: single-token labels that
  are no prefix of another label are then scored with P(end) = 1, and a label set that needs
  more (multi-token or prefix labels) raises `EngineError` naming `endpoint="completions"`.
- **A server that returns no logprobs** raises `EngineError` (we never fall back to parsing
  the generated text: a hard label is not a soft label).

The protocol is synchronous; requests run concurrently on a bounded thread pool over one
`httpx.Client`, and 429/5xx/connection errors are retried with exponential backoff (honouring
`Retry-After`). Other 4xx errors fail at once with the server's message. The defaults suit a slow
server: `concurrency` defaults to the server's slot count when it reports one (llama.cpp's
`/props`), and a timeout says which option to raise.

`/completions` needs the chat template applied on our side: from the HF tokenizer named by
`tokenizer=` (id or path), or, by default, from the server's `/apply-template` route (llama.cpp).

Identity (`engine_id`) covers the base URL, model, endpoint, `top_logprobs`, `extra_body`, the
client-side tokenizer, and what the server reports about the model in `/v1/models` (llama.cpp's
`meta`: parameter count, size, vocabulary, file type; vLLM's `root`/`max_model_len`), so a
different model behind the same URL and alias does not reuse cached judgments.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import numpy as np

from rlaif.judge.cache import cache_key
from rlaif.judge.engines.base import (
    EngineError,
    GenerationParams,
    TopCandidate,
    exact_label_scores,
    missing_label_floor,
)
from rlaif.judge.types import ChatPrompt

__all__ = ["OpenAIEngine", "missing_label_floor", "normalize_token", "top_logprobs_at", "label_log_scores"]

Endpoint = Literal["chat", "completions"]

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_SPACE_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"}
_MAX_BACKOFF_SECONDS = 30.0
_DEFAULT_CONCURRENCY = 4


# ---------------------------------------------------------------------------------------- parsing
def top_logprobs_at(body: Mapping[str, Any], position: int = 0) -> list[TopCandidate]:
    """Top-k candidates of generated token `position` from a (chat or legacy) response.

    Raises `EngineError` when the response carries no log-probs at all. An empty token text is
    how servers render an end-of-turn token; it is marked `special`.
    """
    top = _top_lists(body)
    if len(top) <= position or not top[position]:
        raise EngineError(f"the server returned no top_logprobs for token {position}: {_preview(body)}")
    return top[position]


def _top_lists(body: Mapping[str, Any]) -> list[list[TopCandidate]]:
    """Every returned position's top-k (possibly fewer positions than requested: generation stopped)."""
    choices = body.get("choices")
    if not choices:
        raise EngineError(f"server response has no choices: {_preview(body)}")
    logprobs = choices[0].get("logprobs")
    if not logprobs:
        raise EngineError("the server returned no logprobs; label probabilities need a server that supports "
                          "`logprobs`/`top_logprobs` (vLLM, llama.cpp server, OpenAI chat models)")
    content = logprobs.get("content")
    if content is not None:  # chat shape (also llama.cpp's /v1/completions)
        return [[_candidate(entry["token"], entry["logprob"]) for entry in position.get("top_logprobs") or []]
                for position in content]
    return [[_candidate(token, logprob) for token, logprob in (position or {}).items()]
            for position in logprobs.get("top_logprobs") or []]  # legacy completions shape


def _candidate(token: object, logprob: object) -> TopCandidate:
    text = str(token)
    return TopCandidate(text=text, logprob=float(logprob), special=text == "")  # type: ignore[arg-type]


def _greedy_texts(body: Mapping[str, Any]) -> list[str]:
    """The generated tokens' texts (chat shape `content[i].token`, legacy `tokens`)."""
    logprobs = body["choices"][0].get("logprobs") or {}
    if logprobs.get("content") is not None:
        return [str(position.get("token", "")) for position in logprobs["content"]]
    return [str(token) for token in logprobs.get("tokens") or []]


def normalize_token(token: str, *, at_start: bool) -> str:
    """Token text as it reads in the answer. At the start, leading whitespace is dropped."""
    text = "".join(_SPACE_MARKERS.get(char, char) for char in token)
    return text.lstrip() if at_start else text


def label_log_scores(labels: Sequence[str], fetch: Callable[[str], Sequence[TopCandidate]], *,
                     can_continue: bool = True) -> np.ndarray:
    """log P(reply is exactly label) for each label, from a server's top-k lists. (L,)

    `fetch(prefix)` returns the top-k of the next token once the answer has started with `prefix`."""
    return exact_label_scores(labels, fetch, normalize=lambda text, at_start: normalize_token(text, at_start=at_start),
                              can_continue=can_continue)


def _preview(value: object, chars: int = 300) -> str:
    text = str(value)
    return text if len(text) <= chars else text[:chars] + "..."


# ---------------------------------------------------------------------------------------- engine
class OpenAIEngine:
    """Engine over an OpenAI-compatible HTTP API. Thread-safe; close() (or `with`) releases connections."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 timeout: float = 600.0, max_retries: int = 2, concurrency: int | None = None,
                 endpoint: Endpoint = "chat", top_logprobs: int = 20, tokenizer: str | None = None,
                 extra_body: Mapping[str, Any] | str | None = None, backoff_seconds: float = 0.5) -> None:
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
        # Engine specs ("openai:URL#model?top_logprobs=5") may hand numbers over as strings.
        timeout, max_retries = float(timeout), int(max_retries)
        top_logprobs, backoff_seconds = int(top_logprobs), float(backoff_seconds)
        if concurrency is not None:
            concurrency = int(concurrency)
        if (concurrency is not None and concurrency < 1) or max_retries < 0 or top_logprobs < 1 or timeout <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, top_logprobs >= 1 and timeout > 0")
        if isinstance(extra_body, str):
            try:
                extra_body = json.loads(extra_body)
            except json.JSONDecodeError as exc:
                raise ValueError(f"extra_body must be a JSON object, got {extra_body!r}") from exc
            if not isinstance(extra_body, dict):
                raise ValueError(f"extra_body must be a JSON object, got {extra_body!r}")
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise EngineError(f"api_key_env={api_key_env!r} names an environment variable that is not set")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint: Endpoint = endpoint
        self.top_logprobs = top_logprobs
        self.max_retries = max_retries
        self.timeout = timeout
        self._concurrency = concurrency
        self.backoff_seconds = backoff_seconds
        self.extra_body = dict(extra_body or {})
        self._tokenizer_name = tokenizer
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._server_info: dict[str, Any] | None = None
        self._can_continue = True
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

    # ------------------------------------------------------------------ identity and budgets
    @property
    def engine_id(self) -> str:
        identity = {"url": self.base_url, "model": self.model, "endpoint": self.endpoint, "top_logprobs": self.top_logprobs,
                    "extra_body": self.extra_body, "tokenizer": self._tokenizer_name,
                    "server_model": self._server().get("model")}
        return f"openai:{self.base_url}#{self.model}#{cache_key(identity)[:16]}"

    @property
    def model_name(self) -> str:
        return self.model

    @property
    def concurrency(self) -> int:
        """Requests in flight at once: as given, else the server's slot count, else 4."""
        if self._concurrency is not None:
            return self._concurrency
        slots = self._server().get("slots")
        return int(slots) if isinstance(slots, int) and slots > 0 else _DEFAULT_CONCURRENCY

    @property
    def context_length(self) -> int | None:
        value = self._server().get("context_length")
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def special_tokens(self) -> tuple[str, ...]:
        tokenizer = self._local_tokenizer()
        if tokenizer is None:
            return tuple(self._server().get("special_tokens", ()))
        from rlaif.judge.engines.base import tokenizer_special_tokens

        return tokenizer_special_tokens(tokenizer)

    def prompt_token_counts(self, prompts: Sequence[ChatPrompt]) -> list[int]:
        """Exact with `tokenizer=`; else the server's `/tokenize` (llama.cpp, vLLM); else len(text) / 3."""
        tokenizer = self._local_tokenizer()
        if tokenizer is not None:
            return [len(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True)) for p in prompts]
        return self._map(self._server_token_count, list(prompts))

    def _server_token_count(self, prompt: ChatPrompt) -> int:
        root = self.base_url.removesuffix("/v1")
        try:  # vLLM: chat-aware tokenize
            response = self._client.post(f"{root}/tokenize", json={"model": self.model, "messages": prompt,
                                                                   "add_generation_prompt": True})
            if response.status_code == 200 and isinstance(response.json().get("count"), int):
                return int(response.json()["count"])
            text = self._render(prompt)  # llama.cpp: template, then tokenize the text
            response = self._client.post(f"{root}/tokenize", json={"content": text})
            if response.status_code == 200 and isinstance(response.json().get("tokens"), list):
                return len(response.json()["tokens"])
        except (httpx.HTTPError, EngineError, ValueError):
            pass
        return sum(len(message.get("content", "")) for message in prompt) // 3 + 8

    def _server(self) -> dict[str, Any]:
        """What the server says about itself (fetched once; empty when it says nothing)."""
        if self._server_info is not None:
            return self._server_info
        info: dict[str, Any] = {}
        root = self.base_url.removesuffix("/v1")
        try:
            models = self._client.get(f"{self.base_url}/models", timeout=10.0)
            if models.status_code == 200:
                for entry in models.json().get("data", []):
                    if entry.get("id") == self.model or len(models.json().get("data", [])) == 1:
                        info["model"] = {k: v for k, v in entry.items() if k not in {"created", "object"}}
                        if isinstance(entry.get("max_model_len"), int):
                            info["context_length"] = entry["max_model_len"]
                        break
            props = self._client.get(f"{root}/props", timeout=10.0)
            if props.status_code == 200:
                body = props.json()
                info["slots"] = body.get("total_slots")
                n_ctx = (body.get("default_generation_settings") or {}).get("n_ctx")
                if isinstance(n_ctx, int):
                    info["context_length"] = n_ctx
                info["special_tokens"] = tuple(t for t in (body.get("bos_token"), body.get("eos_token")) if t)
        except (httpx.HTTPError, ValueError):
            return info  # not cached: a server that is down now may answer later
        self._server_info = info
        return info

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ labels
    def label_logprobs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, len(labels)))
        rows = self._map(lambda prompt: self._label_scores(prompt, labels), list(prompts))
        return np.stack(rows)  # (N, L)

    def _label_scores(self, prompt: ChatPrompt, labels: Sequence[str]) -> np.ndarray:
        prompt_text = self._render(prompt) if self.endpoint == "completions" else None
        seen: dict[str, list[TopCandidate]] = {}

        def fetch(prefix: str) -> list[TopCandidate]:
            if prefix in seen:
                return seen[prefix]
            lists, greedy = self._next_tokens(prompt, prompt_text, prefix)
            # The second position is the top-k after the greedy token: reuse it when that token's
            # text is exactly how the continuation request would spell the prefix.
            if len(lists) > 1 and greedy and greedy == normalize_token(greedy, at_start=not prefix):
                seen.setdefault(prefix + greedy, lists[1])
            return lists[0]

        if self._can_continue:
            try:
                return label_log_scores(labels, fetch, can_continue=True)
            except _ContinuationRefused:
                self._can_continue = False
        return label_log_scores(labels, fetch, can_continue=False)

    def _next_tokens(self, prompt: ChatPrompt, prompt_text: str | None, prefix: str) -> tuple[list[list[TopCandidate]], str]:
        """Top-k lists of the next two positions after `prefix`, and the greedy first token's text."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": 2, "temperature": 0.0}
        if self.endpoint == "completions":
            assert prompt_text is not None
            body.update(prompt=prompt_text + prefix, logprobs=self.top_logprobs)
            response = self._post("/completions", body)
        else:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
            if not prefix:
                body["messages"] = prompt
                response = self._post("/chat/completions", body)
            else:
                body.update(messages=[*prompt, {"role": "assistant", "content": prefix}],
                            continue_final_message=True, add_generation_prompt=False)
                try:
                    response = self._post("/chat/completions", body)
                except _ClientError as exc:
                    raise _ContinuationRefused(
                        f"{self.base_url}: the server refused to continue an assistant prefix ({prefix!r}: {exc}); "
                        "labels that span several tokens or are prefixes of other labels need a server that can, "
                        "or endpoint='completions'") from exc
        lists = _top_lists(response)
        if not lists or not lists[0]:
            raise EngineError(f"the server returned no top_logprobs for the next token: {_preview(response)}")
        greedy = _greedy_texts(response)
        return lists, (greedy[0] if greedy else "")

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
        workers = min(self.concurrency, len(items))
        if workers <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-engine") as pool:
            return list(pool.map(fn, items))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on 429/5xx/connection errors; other 4xx raise `_ClientError` at once."""
        url = self.base_url + path
        payload = {**body, **self.extra_body}
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.post(url, json=payload)
            except httpx.TimeoutException as exc:
                raise EngineError(
                    f"{url} did not answer within timeout={self.timeout:g} s ({type(exc).__name__}); a slow or busy "
                    f"server needs a larger timeout or fewer requests at once, e.g. "
                    f"openai:{self.base_url}#{self.model}?timeout={max(2 * self.timeout, 600):g}&concurrency=1") from exc
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

    def _local_tokenizer(self) -> Any:
        if self._tokenizer_name is None:
            return None
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
        return self._tokenizer

    def _render(self, prompt: ChatPrompt) -> str:
        """Chat template applied client-side, for the /completions endpoint."""
        tokenizer = self._local_tokenizer()
        if tokenizer is not None:
            return str(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
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


class _ContinuationRefused(EngineError):
    """The server will not continue a reply from an assistant prefix (hosted APIs)."""


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to exponential backoff
