"""`JudgeClient` / `AsyncJudgeClient`: call a running `rlaif serve` from anywhere, without torch.

Imports only httpx, pydantic, the stdlib and `rlaif.judge.api.protocol` (whose only project import is
`rlaif.judge.types`, itself pydantic-only), so a trainer or labeling job on another machine needs
nothing heavy. Tests check that importing this module loads neither torch, transformers nor
`rlaif.judge.engines`.

Behaviour:
- typed methods per endpoint; requests and responses are the server's own `rlaif.judge.api.protocol`
  models, so a schema change breaks loudly at parse time rather than silently;
- large calls are split into requests of at most `max_items` items (the server's limit;
  `AsyncJudgeClient` sends the pieces concurrently, which the server's micro-batcher merges);
- retries with exponential backoff and jitter on 429, 503 and connection failures, waiting at
  least the server's `Retry-After`; no retry on any other status (a 4xx will not fix itself,
  a 504 means the server is already saturated) nor on read timeouts (the server may still be
  working on the request);
- every failure is a `JudgeServiceError` carrying the HTTP status, the server's error `code`
  and message (`JudgeConnectionError` when the server could not be reached at all).

Example:
    with JudgeClient("http://127.0.0.1:8000", api_key=None) as judge:
        rewards = judge.rewards(prompts, responses).rewards
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from rlaif.judge.types import ChecklistJudgment, PairwiseJudgment, ScoreJudgment
from rlaif.judge.api.protocol import (ChecklistMode, ChecklistRequest, ChecklistRequestItem, ChecklistResponse,
                              CriterionRequest, ErrorResponse, GetRewardRequest, GetRewardResponse, GroupMethod,
                              GroupRequestItem, GroupRewardsRequest, GroupRewardsResponse, HealthResponse, JudgeMode,
                              PairwiseRequest, PairwiseRequestItem, PairwiseResponse, ReadyResponse, RewardMode,
                              RewardRequestItem, RewardScale, RewardsRequest, RewardsResponse, RubricDetail, RubricInfo,
                              RubricList, ScoreRequest, ScoreRequestItem, ScoreResponse)

__all__ = ["AsyncJudgeClient", "JudgeClient", "JudgeConnectionError", "JudgeServiceError", "RetryPolicy"]

ResponseT = TypeVar("ResponseT", bound=BaseModel)
ItemT = TypeVar("ItemT", bound=BaseModel)

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})
# Failures where the request most likely never reached (or was dropped by) the server. Judging is
# idempotent, so resending is safe. Read timeouts are deliberately absent: see the module docstring.
RETRY_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError, httpx.ReadError,
    httpx.WriteError)


class JudgeServiceError(Exception):
    """The judge service answered with an error (or could not be reached, see the subclass).

    `status` is the HTTP status (None when no response arrived), `code` the server's stable
    error code (`queue_full`, `rubric_not_found`, ...), `message` its explanation.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.details = details or []

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}" if self.status is not None else "no response"
        return f"{prefix} ({self.code}): {self.message}" if self.code else f"{prefix}: {self.message}"


class JudgeConnectionError(JudgeServiceError):
    """No HTTP response: connection refused/reset, DNS failure, or a timeout."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter. `retries` is the number of extra attempts after the first."""

    retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 0)."""
        if retry_after is not None:
            # Never earlier than the server asked; a little spread so clients do not return in lockstep.
            return retry_after + random.uniform(0.0, 0.1 * retry_after + 0.05)
        ceiling = min(self.max_backoff, self.backoff * (2 ** attempt))
        return float(ceiling / 2 + random.uniform(0.0, ceiling / 2))  # "equal jitter"


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _ClientCore:
    """What the sync and async clients share: configuration, request bodies, response parsing."""

    def __init__(self, base_url: str, *, api_key: str | None, timeout: float, retry: RetryPolicy | None,
                 max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.retry = retry or RetryPolicy()
        self.max_items = max_items
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:  # never shows the API key
        return f"{type(self).__name__}({self.base_url!r})"

    def _chunks(self, items: Sequence[Any]) -> Iterator[list[Any]]:
        for start in range(0, len(items), self.max_items):
            yield list(items[start:start + self.max_items])

    @staticmethod
    def _error(response: httpx.Response) -> JudgeServiceError:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        try:
            body = ErrorResponse.model_validate_json(response.content)
        except ValidationError:
            text = response.text[:300] or response.reason_phrase
            return JudgeServiceError(text, status=response.status_code, retry_after=retry_after)
        details = [d.model_dump() for d in body.details or []]
        return JudgeServiceError(body.message, status=response.status_code, code=body.code, retry_after=retry_after,
                                 details=details)

    @staticmethod
    def _parse(response: httpx.Response, model: type[ResponseT]) -> ResponseT:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise JudgeServiceError(f"unexpected response body from {response.request.url}: {exc}",
                                    status=response.status_code, code="bad_response") from None


def _as_items(items: Sequence[ItemT | Mapping[str, Any]], model: type[ItemT]) -> list[ItemT]:
    return [item if isinstance(item, model) else model.model_validate(item) for item in items]


CriteriaInput = Sequence[CriterionRequest | Mapping[str, Any] | str]
"""A checklist as the client accepts it: criterion models, `{"text", "weight"}` mappings or bare texts (weight 1)."""


def _criteria(criteria: CriteriaInput) -> list[CriterionRequest]:
    return [CriterionRequest(text=c) if isinstance(c, str) else
            c if isinstance(c, CriterionRequest) else CriterionRequest.model_validate(c) for c in criteria]


def _per_item(name: str, values: Sequence[Any] | None, n: int) -> Sequence[Any]:
    if values is not None and len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} responses; give one per response")
    return values if values is not None else [None] * n


def _reward_items(prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None,
                  reference_answers: Sequence[str | None] | None = None,
                  criteria: Sequence[CriteriaInput | None] | None = None) -> list[RewardRequestItem]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    n = len(responses)
    refs = _per_item("references", references, n)
    answers = _per_item("reference answers", reference_answers, n)
    checklists = _per_item("checklists", criteria, n)
    return [RewardRequestItem(prompt=p, response=r, reference=ref, reference_answer=answer,
                              criteria=_criteria(checklist) if checklist is not None else None)
            for p, r, ref, answer, checklist in zip(prompts, responses, refs, answers, checklists)]


def _group_chunks(groups: Sequence[GroupRequestItem], max_items: int) -> Iterator[list[GroupRequestItem]]:
    """Consecutive groups holding at most `max_items` responses per request (a larger group goes alone)."""
    chunk: list[GroupRequestItem] = []
    size = 0
    for group in groups:
        if chunk and size + len(group.responses) > max_items:
            yield chunk
            chunk, size = [], 0
        chunk.append(group)
        size += len(group.responses)
    if chunk:
        yield chunk


def _merge_groups(parts: list[GroupRewardsResponse]) -> GroupRewardsResponse:
    return parts[0].model_copy(update={"rewards": [r for part in parts for r in part.rewards],
                                       "judgments": [j for part in parts for j in part.judgments]})


def _merge_rewards(parts: list[RewardsResponse]) -> RewardsResponse:
    first = parts[0]
    return first.model_copy(update={"rewards": [r for part in parts for r in part.rewards],
                                    "details": [d for part in parts for d in part.details]})


def _merge_get_reward(parts: list[GetRewardResponse]) -> GetRewardResponse:
    keys = dict.fromkeys(key for part in parts for key in part.extra_logs)
    return GetRewardResponse(rewards=[r for p in parts for r in p.rewards], scores=[s for p in parts for s in p.scores],
                             extra_logs={k: [v for p in parts for v in p.extra_logs.get(k, [])] for k in keys})


class JudgeClient(_ClientCore):
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = 300.0,
                 retry: RetryPolicy | None = None, max_items: int = 256, http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, retry=retry, max_items=max_items)
        self._http = http_client or httpx.Client(timeout=self.timeout)
        self._owns_http = http_client is None

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ endpoints
    def pairwise(self, items: Sequence[PairwiseRequestItem | Mapping[str, Any]], *, rubric: str | None = None,
                 mode: JudgeMode = "logprob") -> list[PairwiseJudgment]:
        """POST /v1/judge/pairwise; one judgment per item, in order."""
        out: list[PairwiseJudgment] = []
        for chunk in self._chunks(_as_items(items, PairwiseRequestItem)):
            body = PairwiseRequest(items=chunk, rubric=rubric, mode=mode)
            out.extend(self._call("POST", "/v1/judge/pairwise", body, PairwiseResponse).judgments)
        return out

    def score(self, items: Sequence[ScoreRequestItem | Mapping[str, Any]], *, rubric: str | None = None,
              mode: JudgeMode = "logprob") -> list[ScoreJudgment]:
        """POST /v1/judge/score; one judgment per item, in order."""
        out: list[ScoreJudgment] = []
        for chunk in self._chunks(_as_items(items, ScoreRequestItem)):
            body = ScoreRequest(items=chunk, rubric=rubric, mode=mode)
            out.extend(self._call("POST", "/v1/judge/score", body, ScoreResponse).judgments)
        return out

    def checklist(self, items: Sequence[ChecklistRequestItem | Mapping[str, Any]], *, rubric: str | None = None,
                  checklist_mode: ChecklistMode = "explicit") -> list[ChecklistJudgment]:
        """POST /v1/judge/checklist; one judgment per item, in order."""
        out: list[ChecklistJudgment] = []
        for chunk in self._chunks(_as_items(items, ChecklistRequestItem)):
            body = ChecklistRequest(items=chunk, rubric=rubric, checklist_mode=checklist_mode)
            out.extend(self._call("POST", "/v1/judge/checklist", body, ChecklistResponse).judgments)
        return out

    def rewards(self, prompts: Sequence[str], responses: Sequence[str], *, references: Sequence[str] | None = None,
                mode: RewardMode = "score", rubric: str | None = None, judge_mode: JudgeMode = "logprob",
                scale: RewardScale = "unit", reference_answers: Sequence[str | None] | None = None,
                criteria: Sequence[CriteriaInput | None] | None = None,
                checklist_mode: ChecklistMode = "explicit") -> RewardsResponse:
        """POST /v1/rewards: one reward per (prompt, response); `references` (baseline responses) for
        mode='pairwise', `criteria` (one checklist per response) for mode='checklist', `reference_answers`
        for reference-guided rubrics."""
        items = _reward_items(prompts, responses, references, reference_answers, criteria)
        parts = [self._call("POST", "/v1/rewards", RewardsRequest(items=chunk, mode=mode, rubric=rubric,
                                                                  judge_mode=judge_mode, scale=scale,
                                                                  checklist_mode=checklist_mode), RewardsResponse)
                 for chunk in self._chunks(items)]
        return _merge_rewards(parts)

    def group_rewards(self, groups: Sequence[GroupRequestItem | Mapping[str, Any]], *, method: GroupMethod = "listwise",
                      orders: int = 4, seed: int = 0, rubric: str | None = None,
                      scale: RewardScale = "unit") -> GroupRewardsResponse:
        """POST /v1/rewards/group: per group, one relative reward per response (requests hold <= max_items responses)."""
        parts = [self._call("POST", "/v1/rewards/group", GroupRewardsRequest(
                     groups=chunk, method=method, orders=orders, seed=seed, rubric=rubric, scale=scale),
                     GroupRewardsResponse)
                 for chunk in _group_chunks(_as_items(groups, GroupRequestItem), self.max_items)]
        return _merge_groups(parts)

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str],
                   labels: Sequence[Any] | None = None) -> GetRewardResponse:
        """POST /get_reward (OpenRLHF protocol): `queries[i]` = `prompts[i]` + response."""
        if len(queries) != len(prompts):
            raise ValueError(f"{len(queries)} queries but {len(prompts)} prompts")
        parts = []
        for start in range(0, len(queries), self.max_items):
            end = start + self.max_items
            body = GetRewardRequest(query=list(queries[start:end]), prompts=list(prompts[start:end]),
                                    labels=list(labels[start:end]) if labels is not None else None)
            parts.append(self._call("POST", "/get_reward", body, GetRewardResponse))
        return _merge_get_reward(parts)

    def rubrics(self) -> list[RubricInfo]:
        return self._call("GET", "/v1/rubrics", None, RubricList).rubrics

    def rubric(self, rubric_id: str) -> RubricDetail:
        return self._call("GET", f"/v1/rubrics/{urllib.parse.quote(rubric_id, safe='')}", None, RubricDetail)

    def health(self) -> HealthResponse:
        """GET /healthz: raises unless the server process answers."""
        return self._call("GET", "/healthz", None, HealthResponse)

    def ready(self) -> ReadyResponse:
        """GET /readyz without retries: `ready=False` (with the reason) while the model loads."""
        response = self._send("GET", "/readyz", None, retry=False)
        if response.status_code in (200, 503):
            return self._parse(response, ReadyResponse)
        raise self._error(response)

    def wait_until_ready(self, timeout: float = 600.0, poll: float = 1.0) -> ReadyResponse:
        """Poll /readyz until ready; raises `JudgeServiceError` on a load failure or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.ready()
                if state.ready:
                    return state
                if state.status == "failed":
                    raise JudgeServiceError(state.message or "model loading failed", status=503, code="not_ready")
            except JudgeConnectionError:
                pass  # server not listening yet
            if time.monotonic() > deadline:
                raise JudgeServiceError(f"service at {self.base_url} not ready after {timeout:g}s", code="not_ready")
            time.sleep(poll)

    # ------------------------------------------------------------------ transport
    def _call(self, method: str, path: str, body: BaseModel | None, model: type[ResponseT]) -> ResponseT:
        response = self._send(method, path, body, retry=True)
        if response.is_error:
            raise self._error(response)
        return self._parse(response, model)

    def _send(self, method: str, path: str, body: BaseModel | None, *, retry: bool) -> httpx.Response:
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        attempts = self.retry.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._http.request(method, self.base_url + path, json=payload, headers=self._headers)
            except RETRY_TRANSPORT_ERRORS as exc:
                if last:
                    raise JudgeConnectionError(f"cannot reach the judge at {self.base_url}: {type(exc).__name__}: {exc}",
                                               code="connection_error") from exc
                time.sleep(self.retry.delay(attempt))
                continue
            except httpx.TimeoutException as exc:
                raise JudgeConnectionError(f"{method} {path} timed out after {self.timeout.read}s",
                                           code="client_timeout") from exc
            if response.status_code in RETRY_STATUSES and not last:
                time.sleep(self.retry.delay(attempt, parse_retry_after(response.headers.get("Retry-After"))))
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover


class AsyncJudgeClient(_ClientCore):
    """asyncio client with the same methods as `JudgeClient` (awaitable); chunks are sent concurrently."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = 300.0,
                 retry: RetryPolicy | None = None, max_items: int = 256,
                 http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key=api_key, timeout=timeout, retry=retry, max_items=max_items)
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)
        self._owns_http = http_client is None

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncJudgeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ endpoints
    async def pairwise(self, items: Sequence[PairwiseRequestItem | Mapping[str, Any]], *, rubric: str | None = None,
                       mode: JudgeMode = "logprob") -> list[PairwiseJudgment]:
        parts = await asyncio.gather(*(
            self._call("POST", "/v1/judge/pairwise", PairwiseRequest(items=chunk, rubric=rubric, mode=mode), PairwiseResponse)
            for chunk in self._chunks(_as_items(items, PairwiseRequestItem))))
        return [j for part in parts for j in part.judgments]

    async def score(self, items: Sequence[ScoreRequestItem | Mapping[str, Any]], *, rubric: str | None = None,
                    mode: JudgeMode = "logprob") -> list[ScoreJudgment]:
        parts = await asyncio.gather(*(
            self._call("POST", "/v1/judge/score", ScoreRequest(items=chunk, rubric=rubric, mode=mode), ScoreResponse)
            for chunk in self._chunks(_as_items(items, ScoreRequestItem))))
        return [j for part in parts for j in part.judgments]

    async def checklist(self, items: Sequence[ChecklistRequestItem | Mapping[str, Any]], *, rubric: str | None = None,
                        checklist_mode: ChecklistMode = "explicit") -> list[ChecklistJudgment]:
        parts = await asyncio.gather(*(
            self._call("POST", "/v1/judge/checklist", ChecklistRequest(items=chunk, rubric=rubric,
                                                                      checklist_mode=checklist_mode), ChecklistResponse)
            for chunk in self._chunks(_as_items(items, ChecklistRequestItem))))
        return [j for part in parts for j in part.judgments]

    async def rewards(self, prompts: Sequence[str], responses: Sequence[str], *,
                      references: Sequence[str] | None = None, mode: RewardMode = "score", rubric: str | None = None,
                      judge_mode: JudgeMode = "logprob", scale: RewardScale = "unit",
                      reference_answers: Sequence[str | None] | None = None,
                      criteria: Sequence[CriteriaInput | None] | None = None,
                      checklist_mode: ChecklistMode = "explicit") -> RewardsResponse:
        items = _reward_items(prompts, responses, references, reference_answers, criteria)
        parts = await asyncio.gather(*(
            self._call("POST", "/v1/rewards", RewardsRequest(items=chunk, mode=mode, rubric=rubric, judge_mode=judge_mode,
                                                             scale=scale, checklist_mode=checklist_mode), RewardsResponse)
            for chunk in self._chunks(items)))
        return _merge_rewards(list(parts))

    async def group_rewards(self, groups: Sequence[GroupRequestItem | Mapping[str, Any]], *,
                            method: GroupMethod = "listwise", orders: int = 4, seed: int = 0, rubric: str | None = None,
                            scale: RewardScale = "unit") -> GroupRewardsResponse:
        parts = await asyncio.gather(*(
            self._call("POST", "/v1/rewards/group", GroupRewardsRequest(
                groups=chunk, method=method, orders=orders, seed=seed, rubric=rubric, scale=scale), GroupRewardsResponse)
            for chunk in _group_chunks(_as_items(groups, GroupRequestItem), self.max_items)))
        return _merge_groups(list(parts))

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str],
                         labels: Sequence[Any] | None = None) -> GetRewardResponse:
        if len(queries) != len(prompts):
            raise ValueError(f"{len(queries)} queries but {len(prompts)} prompts")
        bodies = [GetRewardRequest(query=list(queries[s:s + self.max_items]), prompts=list(prompts[s:s + self.max_items]),
                                   labels=list(labels[s:s + self.max_items]) if labels is not None else None)
                  for s in range(0, len(queries), self.max_items)]
        parts = await asyncio.gather(*(self._call("POST", "/get_reward", body, GetRewardResponse) for body in bodies))
        return _merge_get_reward(list(parts))

    async def rubrics(self) -> list[RubricInfo]:
        return (await self._call("GET", "/v1/rubrics", None, RubricList)).rubrics

    async def rubric(self, rubric_id: str) -> RubricDetail:
        return await self._call("GET", f"/v1/rubrics/{urllib.parse.quote(rubric_id, safe='')}", None, RubricDetail)

    async def health(self) -> HealthResponse:
        return await self._call("GET", "/healthz", None, HealthResponse)

    async def ready(self) -> ReadyResponse:
        response = await self._send("GET", "/readyz", None, retry=False)
        if response.status_code in (200, 503):
            return self._parse(response, ReadyResponse)
        raise self._error(response)

    # ------------------------------------------------------------------ transport
    async def _call(self, method: str, path: str, body: BaseModel | None, model: type[ResponseT]) -> ResponseT:
        response = await self._send(method, path, body, retry=True)
        if response.is_error:
            raise self._error(response)
        return self._parse(response, model)

    async def _send(self, method: str, path: str, body: BaseModel | None, *, retry: bool) -> httpx.Response:
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        attempts = self.retry.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = await self._http.request(method, self.base_url + path, json=payload, headers=self._headers)
            except RETRY_TRANSPORT_ERRORS as exc:
                if last:
                    raise JudgeConnectionError(f"cannot reach the judge at {self.base_url}: {type(exc).__name__}: {exc}",
                                               code="connection_error") from exc
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            except httpx.TimeoutException as exc:
                raise JudgeConnectionError(f"{method} {path} timed out after {self.timeout.read}s",
                                           code="client_timeout") from exc
            if response.status_code in RETRY_STATUSES and not last:
                await asyncio.sleep(self.retry.delay(attempt, parse_retry_after(response.headers.get("Retry-After"))))
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover
