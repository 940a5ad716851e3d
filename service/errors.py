"""Typed service errors. Each class carries its HTTP status and a stable machine-readable code.

The serving layer raises these; `rlaif.service.app` maps every one of them, through a single
exception handler, to the one `ErrorResponse` body (`{"status", "code", "message"}`), so
clients branch on `code`, never on message text. Stdlib only: the client may import it.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: an error the service reports to the caller as a 4xx/5xx `ErrorResponse`."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # Retry-After takes whole seconds (RFC 9110 §10.2.3); round up so clients never come back early.
        return {"Retry-After": str(max(1, int(-(-self.retry_after // 1))))}


class BadRequest(ServiceError):
    """The body is not valid UTF-8 JSON, or the request is otherwise unparsable."""

    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    """API keys are configured and the request carries no valid bearer token."""

    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class BodyTimeout(ServiceError):
    """The request body did not arrive within `body_timeout` seconds (a slow or stalled upload)."""

    status = 408
    code = "body_timeout"


class RubricNotFound(ServiceError):
    """The request names a rubric the service does not serve."""

    status = 404
    code = "rubric_not_found"


class PayloadTooLarge(ServiceError):
    """Too many items, a text longer than `max_chars`, an item over `max_item_tokens`, or a body over
    `max_body_bytes`."""

    status = 413
    code = "payload_too_large"


class InvalidRequest(ServiceError):
    """Well-formed JSON that does not make sense: wrong types, wrong rubric kind, missing reference."""

    status = 422
    code = "invalid_request"


class QueueFull(ServiceError):
    """The micro-batcher's bounded queue is full; retry after `Retry-After` seconds."""

    status = 429
    code = "queue_full"


class EngineFailed(ServiceError):
    """The engine raised while judging the batch this request was part of. The service keeps serving."""

    status = 503
    code = "engine_failed"


class NotReady(ServiceError):
    """The model is still loading (or failed to load), or the service is shutting down."""

    status = 503
    code = "not_ready"


class RequestTimeout(ServiceError):
    """The request waited longer than `request_timeout` seconds for its judgments."""

    status = 504
    code = "timeout"
