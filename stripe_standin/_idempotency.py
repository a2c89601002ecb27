"""Stripe's v1 idempotency layer: keys scoped per API key, replays, and the three misuse errors.

A key is reserved when a POST carrying it starts executing and saved with its reply once execution
ends. A request that failed before execution (validation, injected 500/429/409, a refusal rule)
releases its key, so a retry is executed afresh, as Stripe documents. Keys older than 24 hours (on
the stand-in's clock) are forgotten.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stripe_standin._errors import StripeApiError

__all__ = ["SavedReplies", "SavedReply"]

KEY_LIFETIME = 86_400
"""Seconds after which Stripe may prune a key (the stand-in prunes exactly then)."""
MAX_KEY_LENGTH = 255


@dataclass(slots=True)
class SavedReply:
    """What a key holds: the request it was first used for and, once done, the reply."""

    method: str
    path: str
    fingerprint: str
    created: int
    request_id: str
    status: int | None = None
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def fingerprint(params: Mapping[str, Any]) -> str:
    """A digest of a request's parameters, independent of their order on the wire."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


class SavedReplies:
    """Idempotency keys and the replies saved under them (Stripe's side of idempotency; dualwrite's
    own claims are ``dualwrite.idempotency.IdempotencyStore``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saved: dict[tuple[str, str], SavedReply] = {}
        self._inserts = 0

    def begin(
        self,
        scope: str,
        key: str,
        *,
        method: str,
        path: str,
        params: Mapping[str, Any],
        now: int,
        request_id: str,
    ) -> SavedReply | None:
        """Reserve ``key`` for this request; return the saved reply if it is a replay.

        Raises Stripe's idempotency errors for a reused key with other parameters, on another
        endpoint, or while the first request is still executing.
        """
        if len(key) > MAX_KEY_LENGTH:
            msg = f"Idempotency keys can be at most {MAX_KEY_LENGTH} characters long."
            raise StripeApiError(400, msg, type="idempotency_error")
        digest = fingerprint(params)
        with self._lock:
            saved = self._saved.get((scope, key))
            if saved is not None and saved.created <= now - KEY_LIFETIME:
                saved = None
            if saved is None:
                self._prune(now)
                self._saved[(scope, key)] = SavedReply(method, path, digest, now, request_id)
                return None
            if (saved.method, saved.path) != (method, path):
                msg = (
                    "Keys for idempotent requests can only be used for the same endpoint they were "
                    f"first used for ('{path}' vs '{saved.path}'). Try using a key other than "
                    f"'{key}' if you meant to execute a different request."
                )
                raise StripeApiError(400, msg, type="idempotency_error")
            if saved.fingerprint != digest:
                msg = (
                    "Keys for idempotent requests can only be used with the same parameters they "
                    f"were first used with. Try using a key other than '{key}' if you meant to "
                    "execute a different request."
                )
                raise StripeApiError(400, msg, type="idempotency_error")
            if saved.status is None:
                msg = (
                    "There is currently another in-progress request using this Idempotent Key "
                    "(that probably means you submitted twice, and the other request is still "
                    f"going through): {key}. Please try again later."
                )
                raise StripeApiError(
                    409, msg, type="idempotency_error", code="idempotency_key_in_use"
                )
            return saved

    def finish(
        self,
        scope: str,
        key: str,
        status: int,
        body: dict[str, Any],
        headers: Mapping[str, str],
    ) -> None:
        """Save the reply of an executed request under its key."""
        with self._lock:
            saved = self._saved.get((scope, key))
            if saved is not None:
                saved.status, saved.body, saved.headers = status, body, dict(headers)

    def release(self, scope: str, key: str) -> None:
        """Forget a reservation whose request never began executing."""
        with self._lock:
            saved = self._saved.get((scope, key))
            if saved is not None and saved.status is None:
                del self._saved[(scope, key)]

    def _prune(self, now: int) -> None:
        self._inserts += 1
        if self._inserts % 10_000:
            return
        expired = [k for k, v in self._saved.items() if v.created <= now - KEY_LIFETIME]
        for k in expired:
            del self._saved[k]
