"""The stand-in's errors: its own misuse (``StandinError``) and Stripe's error replies.

``StandinError`` is what a test gets for driving the stand-in wrongly (a bad option, an unknown
object id); it is the stand-in's only exception root (the stand-in shares nothing with dualwrite,
not even its error tree). ``StripeApiError`` is a Stripe refusal, raised inside the stand-in and
turned into an ``{"error": {...}}`` body; it never escapes the app.

Every refusal the stand-in makes goes through ``StripeApiError`` so that the status, the
``type``/``code``/``param`` triple and the message are shaped exactly as Stripe shapes them. API v2
replies use v2's shape (schema ``v2.error`` in stripe/openapi): ``code`` and ``message`` are
required, ``type`` and ``doc_url`` optional, and there is no ``param``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "StandinError",
    "StripeApiError",
    "invalid",
    "missing_param",
    "no_such",
    "unknown_param",
]


class StandinError(Exception):
    """The stand-in was configured or driven incorrectly (a test set-up error)."""


class StripeApiError(Exception):
    """An error reply in Stripe's wire format (never escapes the stand-in's app)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self, *, v2: bool = False) -> dict[str, Any]:
        """The JSON body Stripe sends with this error (``v2``: API v2's shape)."""
        if v2:
            # v2 requires a code; where the stand-in has none (injected 5xx faults), it repeats the
            # type (UNVERIFIED: what Stripe's v2 sends there).
            code = self.code or self.type
            doc_url = f"https://docs.stripe.com/error-codes/{code.replace('_', '-')}"
            return {
                "error": {
                    "type": self.type,
                    "code": code,
                    "message": self.message,
                    "doc_url": doc_url,
                }
            }
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> StripeApiError:
    """A 400 ``invalid_request_error``."""
    return StripeApiError(400, message, code=code, param=param)


def unknown_param(name: str) -> StripeApiError:
    """Stripe's reply to a parameter the endpoint does not take."""
    return invalid(f"Received unknown parameter: {name}", param=name, code="parameter_unknown")


def missing_param(name: str) -> StripeApiError:
    """Stripe's reply to a required parameter that was not sent."""
    return invalid(f"Missing required param: {name}.", param=name, code="parameter_missing")


def no_such(kind: str, object_id: str, *, param: str = "id") -> StripeApiError:
    """Stripe's 404 for an id that names no object (``No such customer: 'cus_x'``)."""
    return StripeApiError(
        404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )
