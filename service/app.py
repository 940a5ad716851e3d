"""`create_app(settings, engine=None)`: the judge service as a FastAPI app.

Thin on purpose: routes parse a `rlaif.service.protocol` model, call `JudgeService` and return its
model. Everything else lives in one place each:
- **lifespan** loads the model in a worker thread (so `/healthz` answers while a large model
  loads and `/readyz` says when it is done), starts the micro-batcher, and on shutdown drains
  queued and in-flight batches before closing the judgment cache;
- **errors**: `rlaif.service.errors.ServiceError` subclasses, request-validation errors, HTTP errors
  and anything unexpected all become the one `ErrorResponse` body, via exception handlers;
  routes declare those statuses in `responses=`;
- **auth**: optional bearer API keys, checked by `AuthMiddleware` from the request headers
  *before anything reads the body* (an unauthenticated client cannot make the server buffer
  16 MB), compared with `hmac.compare_digest`; keys are never logged. Open without a key:
  `/healthz`, `/readyz`, and the OpenAPI docs only with `public_docs`;
- **middleware** (plain ASGI): the body guard (byte limit, read deadline, UTF-8 check before
  FastAPI parses JSON, and cancelling the handler when the client disconnects, so its queued
  items are never judged), and Prometheus request metrics labelled by route template.

Nothing is created at import time: every app gets its own settings, registry and service.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlaif.judge.cache import JudgmentCache
from rlaif.judge.engines.base import Engine
from rlaif.service import errors
from rlaif.service.metrics import ServiceMetrics
from rlaif.service.protocol import (ChecklistRequest, ChecklistResponse, ErrorDetail, ErrorResponse, GetRewardRequest,
                              GetRewardResponse, GroupRewardsRequest, GroupRewardsResponse, HealthResponse,
                              PairwiseRequest, PairwiseResponse, ReadyResponse, RewardsRequest, RewardsResponse,
                              RubricDetail, RubricList, ScoreRequest, ScoreResponse)
from rlaif.service.serving import (JudgeService, RewardScorer, RubricCatalog, load_components, load_served_calibrations,
                                   open_cache)
from rlaif.service.settings import ServiceSettings

logger = logging.getLogger(__name__)

_ERROR_STATUSES = (400, 401, 408, 413, 422, 429, 503, 504)
_RUBRIC_STATUSES = (404,)


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


class ServiceRuntime:
    """Per-app state: settings, catalog, metrics, and the `JudgeService` once the model is loaded."""

    def __init__(self, settings: ServiceSettings, engine: Engine | None, reward_model: RewardScorer | None) -> None:
        self.settings = settings
        self.catalog = RubricCatalog.from_settings(settings)  # fail fast on a bad rubric, before any model loads
        self.calibrations = load_served_calibrations(settings, self.catalog)  # and on a bad calibration file
        self.metrics = ServiceMetrics()
        self.api_keys = [key.encode("utf-8") for key in settings.key_list()]
        self.service: JudgeService | None = None
        self.status: Literal["loading", "ready", "failed", "stopping"] = "loading"
        self.message: str | None = None
        self.ready_event = threading.Event()  # set when ready or failed; lets a CLI thread print the curl example
        self._engine = engine
        self._reward_model = reward_model
        self._load_task: asyncio.Task[None] | None = None
        self._cache: JudgmentCache | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._engine is not None and (self.settings.reward_model is None or self._reward_model is not None):
            await self._become_ready(self._engine, self._reward_model, None)
        else:
            self._load_task = asyncio.create_task(self._load(), name="rlaif-model-loader")

    async def _load(self) -> None:
        try:
            engine, reward_model, reward_name = await asyncio.to_thread(load_components, self.settings, self._engine)
            await self._become_ready(engine, reward_model, reward_name)
        except Exception as exc:  # the server stays up and says why on /readyz
            logger.exception("model loading failed")
            self.status, self.message = "failed", f"model loading failed: {type(exc).__name__}: {exc}"
            self.ready_event.set()

    async def _become_ready(self, engine: Engine, reward_model: RewardScorer | None, reward_name: str | None) -> None:
        self._cache = await asyncio.to_thread(open_cache, self.settings)
        service = JudgeService(engine, self.catalog, self.settings, cache=self._cache, reward_model=reward_model,
                               reward_model_name=reward_name or (str(self.settings.reward_model) if reward_model else None),
                               metrics=self.metrics, calibrations=self.calibrations)
        await service.start()
        self.service = service
        self.status = "ready"
        self.metrics.model_ready.set(1)
        self.ready_event.set()
        logger.info("judge service ready: engine %s", engine.engine_id)

    async def stop(self) -> None:
        self.status = "stopping"
        self.metrics.model_ready.set(0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.service is not None:
            await self.service.stop(timeout=self.settings.request_timeout)
        if self._cache is not None:
            self._cache.close()

    def require_service(self) -> JudgeService:
        if self.service is None or self.status != "ready":
            reason = {"loading": "the model is still loading", "stopping": "the service is shutting down"}.get(
                self.status, self.message or "the model failed to load")
            # A failed load will not fix itself: no Retry-After then, so clients do not wait for nothing.
            retry_after = None if self.status == "failed" else self.settings.retry_after
            raise errors.NotReady(f"not ready: {reason}; see GET /readyz", retry_after=retry_after)
        return self.service

    def readiness(self) -> ReadyResponse:
        service = self.service
        return ReadyResponse(ready=self.status == "ready", status=self.status,
                             engine=service.engine.engine_id if service else None,
                             model=service.engine.model_name if service else None,
                             reward_model=service.reward_model_name if service else None, message=self.message)


# ---------------------------------------------------------------------------- dependencies
def get_runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]


def get_service(runtime: RuntimeDep) -> JudgeService:
    return runtime.require_service()


ServiceDep = Annotated[JudgeService, Depends(get_service)]

# Declares the bearer scheme in the OpenAPI schema only; `AuthMiddleware` enforces it, before bodies are read.
_bearer = HTTPBearer(auto_error=False, description="Needed only when the service runs with RLAIF_API_KEYS.")


def authorized(api_keys: list[bytes], authorization: bytes | None) -> bool:
    """Whether an `Authorization` header carries one of the keys (constant time, compared with every key)."""
    scheme, _, token = (authorization or b"").partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return False
    matched = False
    for key in api_keys:  # compare with every key, so timing does not reveal which one matched
        matched |= hmac.compare_digest(token, key)
    return matched


# ---------------------------------------------------------------------------- routes
def _judge_router() -> APIRouter:
    router = APIRouter(dependencies=[Security(_bearer)])
    judged = _error_responses(*_ERROR_STATUSES, *_RUBRIC_STATUSES)

    @router.post("/v1/judge/pairwise", response_model=PairwiseResponse, responses=judged, tags=["judge"])
    async def judge_pairwise(body: PairwiseRequest, service: ServiceDep) -> PairwiseResponse:
        """Position-debiased soft preferences: P(response_a is better), both orders averaged (RLAIF §2.1)."""
        return await service.pairwise(body)

    @router.post("/v1/judge/score", response_model=ScoreResponse, responses=judged, tags=["judge"])
    async def judge_score(body: ScoreRequest, service: ServiceDep) -> ScoreResponse:
        """Direct scores (d-RLAIF): expected score under the label distribution, rescaled to [0, 1]."""
        return await service.score(body)

    @router.post("/v1/judge/checklist", response_model=ChecklistResponse, responses=judged, tags=["judge"])
    async def judge_checklist(body: ChecklistRequest, service: ServiceDep) -> ChecklistResponse:
        """Per-item checklists (Rubrics as Rewards): weighted mean of P(yes) per criterion, or one implicit score."""
        return await service.checklist(body)

    @router.post("/v1/rewards", response_model=RewardsResponse, responses=judged, tags=["rewards"])
    async def rewards(body: RewardsRequest, service: ServiceDep) -> RewardsResponse:
        """Trainer-facing batch: one reward per (prompt, response), with the judgment behind it."""
        return await service.rewards(body)

    @router.post("/v1/rewards/group", response_model=GroupRewardsResponse, responses=judged, tags=["rewards"])
    async def group_rewards(body: GroupRewardsRequest, service: ServiceDep) -> GroupRewardsResponse:
        """Group-relative rewards for GRPO / RLOO: listwise (seeded orders averaged) or round robin + Bradley-Terry."""
        return await service.group_rewards(body)

    @router.post("/get_reward", response_model=GetRewardResponse, responses=judged, tags=["rewards"])
    async def get_reward(body: GetRewardRequest, service: ServiceDep) -> GetRewardResponse:
        """OpenRLHF remote reward model protocol (`--reward.remote_url` or, before 0.10.2, `--remote_rm_url`)."""
        return await service.get_reward(body)

    @router.get("/v1/rubrics", response_model=RubricList, responses=_error_responses(401), tags=["rubrics"])
    async def list_rubrics(runtime: RuntimeDep) -> RubricList:
        """Rubrics this service serves, with the default of each kind marked."""
        return RubricList(rubrics=runtime.catalog.list())

    @router.get("/v1/rubrics/{rubric_id}", response_model=RubricDetail, responses=_error_responses(401, 404, 422),
                tags=["rubrics"])
    async def get_rubric(rubric_id: str, runtime: RuntimeDep) -> RubricDetail:
        """One rubric's full text: system prompt, template, labels, CoT settings."""
        return runtime.catalog.detail(rubric_id)

    @router.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format."},
        **_error_responses(401)}, tags=["status"])
    async def metrics(runtime: RuntimeDep) -> Response:
        """Prometheus metrics (see `rlaif.service.metrics`)."""
        return Response(content=runtime.metrics.render(), media_type=runtime.metrics.content_type)

    return router


def _health_router() -> APIRouter:
    router = APIRouter(tags=["status"])  # open even when API keys are set: load balancers probe these

    @router.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        """The process is up and serving HTTP (the model may still be loading)."""
        return HealthResponse()

    @router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def readyz(runtime: RuntimeDep) -> Any:
        """200 once the model is loaded and the batcher runs; 503 while loading, after a load failure, or stopping."""
        readiness = runtime.readiness()
        if readiness.ready:
            return readiness
        return JSONResponse(readiness.model_dump(mode="json"), status_code=503)

    return router


# ---------------------------------------------------------------------------- error handlers
def _error_json(status: int, code: str, message: str, details: list[ErrorDetail] | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(status=status, code=code, message=message, details=details)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers)


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    return _error_json(exc.status, exc.code, exc.message, headers=exc.headers())


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    decode = next((p for p in problems if p.get("type") == "json_invalid"), None)
    if decode is not None:
        where = decode.get("loc", ("body", "?"))[-1]
        reason = (decode.get("ctx") or {}).get("error", "invalid JSON")
        return _error_json(400, "bad_request", f"malformed JSON body: {reason} (at character {where})")
    details = []
    for problem in problems:
        loc = [str(part) for part in problem.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        details.append(ErrorDetail(loc=".".join(loc) or "body", message=str(problem.get("msg", "invalid")),
                                   type=str(problem.get("type", "value_error"))))
    summary = "; ".join(f"{d.loc}: {d.message}" for d in details[:5])
    more = f" (+{len(details) - 5} more)" if len(details) > 5 else ""
    return _error_json(422, "invalid_request", f"invalid request: {summary}{more}", details=details)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _error_json(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                       headers=dict(exc.headers or {}))


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return _error_json(500, "internal_error", "internal server error; the server log has the details")


# ---------------------------------------------------------------------------- middleware
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def _may_have_body(scope: Scope) -> bool:
    return scope["method"] in _BODY_METHODS or _header(scope, b"content-length") not in (None, b"0") \
        or _header(scope, b"transfer-encoding") is not None


class AuthMiddleware:
    """401 for requests without a valid API key, decided from the headers alone, before any body is read.

    A body left unread is not drained: the 401 carries `Connection: close`, so an unauthenticated
    client costs the server a header block, never its upload (40 unauthenticated 15 MB bodies
    used to grow the process by 2.5 GB while they were buffered for the key check).
    """

    def __init__(self, app: ASGIApp, api_keys: list[bytes], open_paths: frozenset[str]) -> None:
        self.app = app
        self.api_keys = api_keys
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization")
        if authorized(self.api_keys, authorization):
            await self.app(scope, receive, send)
            return
        message = ("invalid API key" if authorization is not None
                   else "this service needs an API key: send `Authorization: Bearer <key>`")
        await _send_error(send, errors.Unauthorized(message), close=_may_have_body(scope))


class BodyGuardMiddleware:
    """Read the request body under limits, then run the app and cancel it if the client goes away.

    - more than `max_bytes` -> 413 (at once when Content-Length says so, else as soon as the count
      passes the limit), not all of the body within `timeout_s` -> 408, not UTF-8 -> 400; each
      before FastAPI parses JSON. The body is buffered here (bounded) and replayed to the app.
    - Starlette does not cancel a handler when its client disconnects, so a request whose client
      gave up would still be queued and judged. Once the body is in, this middleware owns the
      server's `receive`: when it reports `http.disconnect` before a response was sent, the
      handler task is cancelled, and the micro-batcher drops its queued items.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = errors.PayloadTooLarge(f"request body over max_body_bytes={self.max_bytes}; send fewer or shorter items")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, too_large, close=True)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await _send_error(send, errors.BodyTimeout(
                    f"the request body did not arrive within body_timeout={self.timeout_s:g}s"), close=True)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, too_large, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await _send_error(send, errors.BadRequest(f"request body is not valid UTF-8 (byte {exc.start}); "
                                                      "send UTF-8 encoded JSON"))
            return
        await self._run_until_disconnect(scope, body, receive, send)

    async def _run_until_disconnect(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        disconnected = asyncio.Event()
        replayed = responded = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def tracked_send(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, replay, tracked_send))
        # After the whole body, the server's receive() returns only once the client disconnected
        # or the response is complete.
        watcher = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and not responded:
                disconnected.set()
                handler.cancel()  # the client is gone: nobody will read the answer
            await asyncio.wait({handler})
        finally:
            watcher.cancel()
            if not handler.done():  # this middleware itself was cancelled (server shutdown)
                handler.cancel()
        if not handler.cancelled():
            handler.result()  # re-raise what the app raised


async def _send_error(send: Send, exc: errors.ServiceError, *, close: bool = False) -> None:
    """Send the one error body from middleware. `close`: the request body was left unread, so the
    connection must not be reused (the server closes it after the response)."""
    payload = ErrorResponse(status=exc.status, code=exc.code, message=exc.message).model_dump(mode="json", exclude_none=True)
    content = json.dumps(payload).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in exc.headers().items()),
               *([(b"connection", b"close")] if close else [])]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


class MetricsMiddleware:
    """Count and time every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, route_of: Callable[[Scope], str]) -> None:
        self.app = app
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 499  # stays so only when no response was sent: the client disconnected first (nginx's 499)

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.observe_request(self.route_of(scope), scope["method"], status, time.perf_counter() - started)


def _route_resolver(routers: list[APIRouter]) -> Callable[[Scope], str]:
    """Map a request to its route template, also for requests refused before routing (413, 400)."""
    templates = [(route.path_regex, route.path) for router in routers for route in router.routes
                 if hasattr(route, "path_regex") and hasattr(route, "path")]

    def route_of(scope: Scope) -> str:
        route = scope.get("route")  # set by recent Starlette routers
        if route is not None and isinstance(getattr(route, "path", None), str):
            return str(route.path)
        path = scope.get("path", "")
        for regex, template in templates:
            if regex.match(path):
                return str(template)
        return "unmatched"  # one label for every unknown path: bounded cardinality under scans

    return route_of


# ---------------------------------------------------------------------------- factory
def create_app(settings: ServiceSettings | None = None, engine: Engine | None = None, *,
               reward_model: RewardScorer | None = None) -> FastAPI:
    """Build the service app. `engine=None` loads `settings.engine` in the background at startup.

    Passing an `engine` (tests, scripts, another process's model) skips loading it; a
    `reward_model` object may be passed the same way instead of `settings.reward_model`.
    """
    settings = settings or ServiceSettings()
    runtime = ServiceRuntime(settings, engine, reward_model)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="rlaif judge service", version="0.1.0", lifespan=lifespan,
                  description="LLM-as-a-judge for RLAIF: pairwise and direct-score judgments, trainer rewards and "
                              "OpenRLHF's remote reward protocol, with micro-batching. See docs/service.md.")
    app.state.runtime = runtime
    routers = [_health_router(), _judge_router()]
    for router in routers:
        app.include_router(router)
    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
        errors.ServiceError: _service_error, RequestValidationError: _validation_error,
        StarletteHTTPException: _http_error, Exception: _unexpected_error}
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
    docs = {path for path in (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url) if path}
    open_paths = frozenset({"/healthz", "/readyz", *(docs if settings.public_docs else ())})
    # Starlette runs the last-added middleware first: metrics -> auth -> body guard -> routes.
    app.add_middleware(BodyGuardMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout)
    app.add_middleware(AuthMiddleware, api_keys=runtime.api_keys, open_paths=open_paths)
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics, route_of=_route_resolver(routers))  # sees 401s too
    return app
