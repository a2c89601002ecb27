"""The HTTP edge both front doors share (the middleware, the proxy, and the endpoints they serve).

* ``read_body``: a request body read whole, under a cap (nothing past the cap is read or kept). A
  caller that disconnects before its body is complete raises ``ClientDisconnectedError``: an
  incomplete body is never used (a form cut after ``quantity=1`` could have said ``quantity=12``).
* ``stripe_error``: a reply in Stripe's error shape (``models.stripe_error_body``).
* ``failure_reply``: Stripe's refusal of a write handed back as Stripe sent it, status and headers.
* ``usage_error``: the reply to usage the engine would not record; ``unavailable``: 503 for a
  reason of the server's own.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Receive

from dualwrite.exceptions import (
    ClientDisconnectedError,
    ConflictError,
    IdempotencyError,
    UsageInputError,
)
from dualwrite.models import StripeFailure, stripe_error_body

__all__ = ["failure_reply", "read_body", "stripe_error", "unavailable", "usage_error"]


def stripe_error(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A response with Stripe's error shape: ``{"error": {"type", "message", "code", "param"}}``."""
    body = stripe_error_body(error_type, message, code=code, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` bytes (reading stops there).

    Raises:
        ClientDisconnectedError: the caller disconnected before the body was complete.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def failure_reply(failure: StripeFailure) -> JSONResponse:
    """Stripe's status and error for a write (or read) Stripe refused, with its ``Request-Id``,
    ``Retry-After`` and ``Stripe-Should-Retry``; 502 when the network failed on the way."""
    headers = {"Stripe-Should-Retry": "true" if failure.retryable else "false"}
    if failure.request_id:
        headers["Request-Id"] = failure.request_id
    if failure.retry_after is not None:
        headers["Retry-After"] = f"{failure.retry_after:g}"
    if failure.http_status is None:
        message = "Stripe could not be reached. Retry with the same Idempotency-Key."
        return stripe_error(502, message, error_type="api_error", headers=headers)
    return JSONResponse(failure.error_body(), status_code=failure.http_status, headers=headers)


def usage_error(exc: UsageInputError | ConflictError) -> JSONResponse:
    """The reply to usage the engine would not record: 400 naming the field, 400
    ``idempotency_error`` for a reused identifier, 409 (retry) while it is being recorded."""
    if isinstance(exc, IdempotencyError):
        return stripe_error(400, exc.message, error_type="idempotency_error", code=exc.code)
    if isinstance(exc, UsageInputError):
        return stripe_error(400, exc.message, code=exc.code, param=exc.param)
    return stripe_error(
        409, str(exc), code="idempotency_key_in_use", headers={"Stripe-Should-Retry": "true"}
    )


def unavailable() -> JSONResponse:
    """503: usage cannot be recorded now, for a reason of the server's own (its log says which)."""
    return stripe_error(
        503,
        "Usage cannot be recorded right now; nothing was recorded. Retry later.",
        error_type="api_error",
    )
