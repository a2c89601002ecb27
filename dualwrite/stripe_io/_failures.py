"""Stripe's exceptions turned into ``StripeFailure`` values, classified retryable or permanent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import stripe

from dualwrite.models import Leg, StripeFailure, WriteResult
from dualwrite.redaction import redact

__all__ = ["SESSION_EXPIRED", "as_dict", "failure_from_exception", "refused"]

#: Stripe's code when a v2 meter event session token has expired.
SESSION_EXPIRED = "billing_meter_event_session_expired"


def as_dict(data: object) -> dict[str, Any]:
    """A response body as a plain dict (empty when it is not a mapping)."""
    return dict(data) if isinstance(data, Mapping) else {}


def refused(leg: Leg, exc: stripe.StripeError) -> WriteResult:
    """The WriteResult of a write Stripe (or the network) refused."""
    failure = failure_from_exception(exc)
    return WriteResult(leg=leg, accepted=False, http_status=failure.http_status, failure=failure)


def failure_from_exception(exc: stripe.StripeError) -> StripeFailure:
    """Classify a Stripe SDK exception, keeping Stripe's type, code and message (secrets masked)."""
    headers = {str(k).lower(): str(v) for k, v in (exc.headers or {}).items()}
    status = exc.http_status
    error: dict[str, Any] = {}
    if isinstance(exc.json_body, Mapping) and isinstance(exc.json_body.get("error"), Mapping):
        error = dict(exc.json_body["error"])
    network = isinstance(exc, stripe.APIConnectionError) and status is None
    should_retry = headers.get("stripe-should-retry")
    if error.get("code") == SESSION_EXPIRED:
        retryable = True  # the session's fault, not the events': a new session sends them
    elif should_retry == "true":
        retryable = True
    elif should_retry == "false":
        retryable = False
    else:
        retryable = network or status in (409, 429) or (status is not None and status >= 500)
    message = str(error.get("message") or exc.user_message or type(exc).__name__)
    if network:
        message = f"network error talking to Stripe: {_network_reason(exc)}"
    return StripeFailure(
        http_status=status,
        type=str(error.get("type") or ("api_connection_error" if network else "api_error")),
        code=str(error["code"]) if error.get("code") else None,
        message=redact(message),
        param=str(error["param"]) if error.get("param") else None,
        retryable=retryable,
        retry_after=_retry_after(headers.get("retry-after")),
        request_id=exc.request_id,
    )


def _network_reason(exc: stripe.StripeError) -> str:
    cause = exc.__cause__
    if isinstance(cause, TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    if cause is not None:
        return type(cause).__name__
    return "connection failed"


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
