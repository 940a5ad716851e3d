"""`create_review_app(settings, source)`: the review page (server-rendered HTML + one small script).

Routes: `GET /` (first unanswered pair of the queue), `GET /item/{key}` (one pair), `POST /api/labels`
(an answer), `GET /api/labels` (every answer, JSON), `POST /api/annotator` (the name recorded without
API keys), `GET /agreement` (+ `/agreement/reliability.png`), `GET|POST /login`, `GET /healthz`.

Security, the service's defaults plus what a browser page needs:
- binds 127.0.0.1 by default; the `Host` header must name this server (a DNS-rebinding page cannot
  read or write through the browser of someone on the machine);
- optional API keys (`name:key`), compared in constant time (`rlaif.service.app.authorized`); API
  clients send `Authorization: Bearer`, browsers log in once and hold an HttpOnly SameSite=Strict
  session cookie; the key's name is the annotator;
- every text from a dataset, model or person is HTML-escaped by Jinja2 autoescaping; markdown is
  rendered by markdown-it with raw HTML off and its link validation (no `javascript:` links); a
  Content-Security-Policy allows scripts, styles and images from this origin only (no inline script);
- writes need JSON, an `X-CSRF-Token` header matching the page's token (per session with keys, per
  process without) and no cross-site `Sec-Fetch-Site`; bodies are capped (`max_body_bytes`, 413)
  and notes too (`max_note_chars`, 422).
"""

from __future__ import annotations

import hmac
import secrets
import tempfile
import time
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlencode

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from rlaif.judge.labeling.review import (HumanLabel, HumanLabelStore, ReviewItem, ReviewSource, agreement,
                                         ordered_queue)
from rlaif.service.app import BodyGuardMiddleware, authorized
from rlaif.service.review.settings import ANNOTATOR_PATTERN, ReviewSettings

HERE = Path(__file__).parent
SESSION_COOKIE = "rlaif_review_session"
ANNOTATOR_COOKIE = "rlaif_review_annotator"
OPEN_PATHS = ("/login", "/healthz", "/static/")
QUEUE_ORDER = ("Pairs are ordered by how much a person's answer tells about the judge: the two presentation "
               "orders disagree (+3), the judge's probability is near 0.5 (+2 x (1 - margin)), its label mass is "
               "below 0.5 (+1), a reward model disagrees with it (+2). Ties keep the source's order.")


class LabelRequest(BaseModel):
    """One answer from the page (or an API client)."""

    model_config = {"extra": "forbid"}

    item: str = Field(max_length=64)
    answer: Literal["1", "2", "tie", "skip"]
    note: str = ""
    shown_left: Literal["1", "2"] | None = None


class AnnotatorRequest(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(max_length=64)


class ReviewState:
    """Per-app state: the source, the store, sessions and the process CSRF token."""

    def __init__(self, settings: ReviewSettings, source: ReviewSource) -> None:
        self.settings = settings
        self.source = source
        self.queue = ordered_queue(source.items)
        self.position = {item.key: n for n, item in enumerate(self.queue)}
        self.store = HumanLabelStore(source.store_path)
        self.keys = settings.named_keys()
        self.api_keys = [key.encode() for key in self.keys]
        self.sessions: dict[str, tuple[str, str]] = {}  # session id -> (annotator, csrf token)
        self.csrf = secrets.token_urlsafe(32)

    def session(self, request: Request) -> tuple[str, str] | None:
        sid = request.cookies.get(SESSION_COOKIE)
        return self.sessions.get(sid) if sid else None


def _state(request: Request) -> ReviewState:
    return request.app.state.review


StateDep = Annotated[ReviewState, Depends(_state)]


def _bearer_name(state: ReviewState, request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None or not authorized(state.api_keys, header.encode()):
        return None
    token = header.partition(" ")[2].strip()
    return next((name for key, name in state.keys.items() if hmac.compare_digest(key.encode(), token.encode())), None)


def annotator_of(state: ReviewState, request: Request) -> str:
    if state.keys:
        session = state.session(request)
        if session is not None:
            return session[0]
        name = _bearer_name(state, request)
        assert name is not None, "AuthMiddleware let an unauthenticated request through"
        return name
    name = request.cookies.get(ANNOTATOR_COOKIE)
    return name if name and ANNOTATOR_PATTERN.match(name) else state.settings.annotator


def csrf_of(state: ReviewState, request: Request) -> str:
    session = state.session(request) if state.keys else None
    return session[1] if session else state.csrf


class ReviewGuardMiddleware:
    """Host check, authentication (bearer or session cookie) and security headers on every response."""

    def __init__(self, app: ASGIApp, state: ReviewState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host", "").rsplit(":", 1)[0].strip("[]").lower()
        allowed = {"127.0.0.1", "localhost", "::1", self.state.settings.host.lower()}
        if host not in allowed:
            await _plain(send, 421, f"unexpected Host header {host[:80]!r}: open the page at its own address")
            return
        path = scope["path"]
        if scope["method"] == "POST" and path.startswith("/api/") \
                and not headers.get("content-type", "").startswith("application/json"):
            # Before the body is parsed: a form post (what a cross-site page can send without CORS) is no answer.
            await _json(send, 415, {"status": 415, "code": "unsupported_media_type",
                                    "message": "send JSON (Content-Type: application/json)"})
            return
        if self.state.keys and not path.startswith(OPEN_PATHS):
            sid = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
            ok = (sid is not None and sid in self.state.sessions) or authorized(
                self.state.api_keys, headers["authorization"].encode() if "authorization" in headers else None)
            if not ok:
                if scope["method"] == "GET" and not path.startswith("/api/"):
                    await _redirect(send, "/login?" + urlencode({"next": path}))
                else:
                    await _json(send, 401, {"status": 401, "code": "unauthorized",
                                            "message": "log in at /login, or send `Authorization: Bearer <key>`"},
                                [(b"www-authenticate", b"Bearer")])
                return

        async def secured(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
                          b"img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                          b"base-uri 'none'"),
                         (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, secured)


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    import json

    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "code": code, "message": message}, status_code=status)


# ---------------------------------------------------------------------------------- rendering
def _templates():
    import jinja2
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined)

    def markdown(text: str, limit: int) -> Markup:
        shown = text if len(text) <= limit else text[:limit]
        html = md.render(shown)  # raw HTML in `text` is escaped; javascript:/vbscript:/data: links are refused
        if len(text) > limit:
            html += f'<p class="cut">({len(text) - limit:,} more characters not shown)</p>'
        return Markup(html)

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    def num(value: float | None, digits: int = 2) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    env.filters.update(markdown=markdown, pct=pct, num=num)
    return env


def _filters(request: Request) -> dict[str, str]:
    q = request.query_params
    return {name: q.get(name, "") for name in ("rubric", "consistency", "status") if q.get(name)}


def _matches(item: ReviewItem, filters: dict[str, str], mine: dict[str, HumanLabel]) -> bool:
    if filters.get("rubric") and item.rubric_id != filters["rubric"]:
        return False
    consistency = filters.get("consistency")
    if consistency == "consistent" and item.consistent is not True:
        return False
    if consistency == "inconsistent" and item.consistent is not False:
        return False
    status = filters.get("status")
    answer = mine.get(item.key)
    if status == "unanswered" and answer is not None:
        return False
    if status == "answered" and answer is None:
        return False
    if status in ("agree", "disagree"):
        if answer is None or answer.answer not in ("1", "2") or item.judge_prob is None:
            return False
        agrees = (answer.answer == "1") == (item.judge_prob > 0.5)
        if agrees != (status == "agree"):
            return False
    return True


def _url(path: str, filters: dict[str, str]) -> str:
    return path + ("?" + urlencode(filters) if filters else "")


# ---------------------------------------------------------------------------------- factory
def create_review_app(settings: ReviewSettings, source: ReviewSource) -> FastAPI:
    """The review app for one source; its human labels go to `source.store_path`."""
    state = ReviewState(settings, source)
    env = _templates()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            state.store.close()

    app = FastAPI(title="rlaif review", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = state
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(request: Request, template: str, **context: Any) -> HTMLResponse:
        annotator = annotator_of(state, request)
        mine = {k: v[annotator] for k, v in state.store.current(annotator).items()}
        done = sum(1 for item in source.items if item.key in mine)
        html = env.get_template(template).render(
            source=source, annotator=annotator, csrf=csrf_of(state, request), keys=bool(state.keys),
            progress={"done": done, "total": len(source.items)}, settings=settings, **context)
        return HTMLResponse(html)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        return _error(422, "invalid_request", f"invalid request: {problems}")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> Response:
        annotator = annotator_of(state, request)
        mine = {k: v[annotator] for k, v in state.store.current(annotator).items()}
        filters = _filters(request)
        shown = [item for item in state.queue if _matches(item, filters, mine)]
        first = next((item for item in shown if item.key not in mine), shown[0] if shown else None)
        if first is None:
            return page(request, "empty.html", filters=filters, rubrics=source.rubrics)
        return RedirectResponse(_url(f"/item/{first.key}", filters), status_code=303)

    @app.get("/item/{key}", response_class=HTMLResponse)
    async def item_page(key: str, request: Request) -> Response:
        item = source.by_key.get(key)
        if item is None:
            return HTMLResponse("<!doctype html><title>not found</title><p>No such pair.</p>", status_code=404)
        annotator = annotator_of(state, request)
        mine = {k: v[annotator] for k, v in state.store.current(annotator).items()}
        filters = _filters(request)
        shown = [i for i in state.queue if _matches(i, filters, mine) or i.key == key]
        at = next(n for n, i in enumerate(shown) if i.key == key)
        after = next((i for i in shown[at + 1:] + shown[:at] if i.key not in mine), None)
        everyone = state.store.current().get(key, {})
        answer = mine.get(key)
        score, reasons = item.priority()
        left, right = (item.response_1, item.response_2) if item.left_is_1 else (item.response_2, item.response_1)
        judge = None
        if item.judge_prob is not None and not (settings.blind and answer is None):
            flip = (lambda p: p) if item.left_is_1 else (lambda p: None if p is None else 1 - p)
            judge = {"prob_left": flip(item.judge_prob),
                     "left_first": flip(item.prob_1_first if item.left_is_1 else item.prob_1_second),
                     "right_first": flip(item.prob_1_second if item.left_is_1 else item.prob_1_first)}
        answer_side = None
        if answer is not None:
            answer_side = {"tie": "tie", "skip": "skip"}.get(answer.answer) or (
                "left" if (answer.answer == "1") == item.left_is_1 else "right")
        return page(request, "item.html", item=item, left=left, right=right, judge=judge, answer=answer,
                    answer_side=answer_side, others=[label for name, label in sorted(everyone.items()) if name != annotator],
                    position=at + 1, shown=len(shown), filters=filters, rubrics=source.rubrics,
                    prev_url=_url(f"/item/{shown[at - 1].key}", filters) if at > 0 else "",
                    next_url=_url(f"/item/{shown[at + 1].key}", filters) if at + 1 < len(shown) else "",
                    after_url=_url(f"/item/{after.key}", filters) if after else _url("/agreement", {}),
                    priority=score, reasons=reasons, queue_order=QUEUE_ORDER, left_id="1" if item.left_is_1 else "2")

    def check_write(request: Request) -> JSONResponse | None:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _error(415, "unsupported_media_type", "send the answer as JSON (Content-Type: application/json)")
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return _error(403, "forbidden", "cross-site write refused")
        if state.keys and state.session(request) is None:
            return None  # a bearer-key API client: the key is no ambient credential, so no CSRF token is needed
        token = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(token.encode(), csrf_of(state, request).encode()):
            return _error(403, "csrf", "missing or wrong X-CSRF-Token; reload the page")
        return None

    @app.post("/api/labels")
    async def add_label(body: LabelRequest, request: Request) -> JSONResponse:
        refused = check_write(request)
        if refused is not None:
            return refused
        if body.item not in source.by_key:
            return _error(404, "not_found", f"no pair with key {body.item[:64]!r} in this source")
        if len(body.note) > settings.max_note_chars:
            return _error(422, "invalid_request", f"note has {len(body.note)} characters; at most "
                                                  f"max_note_chars={settings.max_note_chars}")
        label = state.store.add(body.item, body.answer, annotator_of(state, request), note=body.note,
                                shown_left=body.shown_left)
        return JSONResponse(label.model_dump())

    @app.get("/api/labels")
    async def list_labels() -> JSONResponse:
        return JSONResponse([label.model_dump() for label in state.store.history()])

    @app.post("/api/annotator")
    async def set_annotator(body: AnnotatorRequest, request: Request) -> JSONResponse:
        refused = check_write(request)
        if refused is not None:
            return refused
        if state.keys:
            return _error(409, "conflict", "with API keys the annotator is the key's name")
        if not ANNOTATOR_PATTERN.match(body.name):
            return _error(422, "invalid_request", "names are 1-64 letters, digits, spaces or . @ _ -")
        response = JSONResponse({"annotator": body.name})
        response.set_cookie(ANNOTATOR_COOKIE, body.name, httponly=True, samesite="strict", max_age=365 * 86400)
        return response

    @app.get("/agreement", response_class=HTMLResponse)
    async def agreement_page(request: Request) -> HTMLResponse:
        report, _ = agreement(source, state.store)
        return page(request, "agreement.html", report=report, stamp=int(time.time()))

    @app.get("/agreement/reliability.png")
    async def reliability_png() -> Response:
        from rlaif.judge.metrics import plot_reliability_diagram, reliability_bins

        _, (probs, outcomes) = agreement(source, state.store)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reliability.png"
            bins = reliability_bins(probs, outcomes) if len(probs) else []
            plot_reliability_diagram(bins, path, title="judge vs people",
                                     xlabel="judge's P(left response better)")
            return Response(path.read_bytes(), media_type="image/png")

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request, next: str = "/", error: str = "") -> HTMLResponse:
        html = env.get_template("login.html").render(next=next if next.startswith("/") and not next.startswith("//") else "/",
                                                     error=error, keys=bool(state.keys))
        return HTMLResponse(html)

    @app.post("/login")
    async def login(request: Request) -> Response:
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return _error(403, "forbidden", "cross-site login refused")
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)  # no multipart needed
        key, next = form.get("key", [""])[0], form.get("next", ["/"])[0]
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        name = state.keys.get(key) if key else None
        matched = any(hmac.compare_digest(key.encode(), k.encode()) for k in state.keys) if key else False
        if not matched or name is None:
            return RedirectResponse("/login?" + urlencode({"next": target, "error": "unknown key"}), status_code=303)
        sid = secrets.token_urlsafe(32)
        state.sessions[sid] = (name, secrets.token_urlsafe(32))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict")
        return response

    app.add_middleware(BodyGuardMiddleware, max_bytes=settings.max_body_bytes, timeout_s=30.0)
    app.add_middleware(ReviewGuardMiddleware, state=state)
    return app
