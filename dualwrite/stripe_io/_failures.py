"""Stripe's exceptions turned into ``StripeFailure`` values, classified retryable or permanent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import stripe

from dualwrite.models import Leg, StripeFailure, WriteResult
from dualwrite.redaction import redact

__all__ = [
    "SESSION_EXPIRED",
    "as_dict",
    "failure_from_exception",
    "failure_from_reply",
    "refused",
    "retryable",
]

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
    network = isinstance(exc, stripe.APIConnectionError) and exc.http_status is None
    return failure_from_reply(
        exc.http_status,
        {str(k).lower(): str(v) for k, v in (exc.headers or {}).items()},
        exc.json_body,
        network_reason=_network_reason(exc) if network else None,
        fallback=str(exc.user_message or type(exc).__name__),
        request_id=exc.request_id,
    )


def failure_from_reply(
    status: int | None,
    headers: Mapping[str, str],
    body: object,
    *,
    network_reason: str | None = None,
    fallback: str | None = None,
    request_id: str | None = None,
) -> StripeFailure:
    """Classify a reply of Stripe's (the SDK's exceptions and the proxy's forwarded replies alike),
    keeping Stripe's type, code and message (secrets masked).

    Args:
        status: the HTTP status (``None``: no reply, the network failed).
        headers: the reply's headers, names lowercased.
        body: the reply's decoded JSON body (anything else reads as no error detail).
        network_reason: why the network failed, when it did.
        fallback: the message when Stripe's body has none (default: ``HTTP <status> from Stripe``).
        request_id: Stripe's request id (default: the ``Request-Id`` header).
    """
    raw = body.get("error") if isinstance(body, Mapping) else None
    error: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    code = str(error["code"]) if error.get("code") else None
    network = network_reason is not None
    message = str(error.get("message") or fallback or f"HTTP {status} from Stripe")
    if network:
        message = f"network error talking to Stripe: {network_reason}"
    return StripeFailure(
        http_status=status,
        type=str(error.get("type") or ("api_connection_error" if network else "api_error")),
        code=code,
        message=redact(message),
        param=str(error["param"]) if error.get("param") else None,
        retryable=retryable(
            status, should_retry=headers.get("stripe-should-retry"), code=code, network=network
        ),
        retry_after=_retry_after(headers.get("retry-after")),
        request_id=request_id or headers.get("request-id"),
    )


def retryable(
    status: int | None, *, should_retry: str | None, code: str | None = None, network: bool = False
) -> bool:
    """Whether a refused request is worth sending again, in Stripe's SDKs' order: an expired v2
    session first (the session's fault, not the events'), then ``Stripe-Should-Retry``, then a
    network failure, 409, 429 and 5xx."""
    if code == SESSION_EXPIRED:
        return True
    if should_retry in ("true", "false"):
        return should_retry == "true"
    return network or status in (409, 429) or (status is not None and status >= 500)


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
