"""Injected failures: random faults at a configured rate, and permanent refusal rules.

Kinds of random fault and what each does to a request:

* ``"500"`` / ``"503"``: an ``api_error`` reply; the request is not executed and nothing is saved
  under its Idempotency-Key (Stripe saves results only once execution began).
* ``"429"``: ``rate_limit`` with ``Stripe-Should-Retry: true``; not executed.
* ``"409"``: ``lock_timeout``; not executed.
* ``"timeout"``: the request IS executed and its reply saved under its Idempotency-Key, but the
  reply is held back for ``timeout_seconds``, so the client gives up and retries; the retry then
  gets the saved reply (``Idempotent-Replayed: true``). This is what proves exactly-once delivery.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stripe_standin._errors import StandinError, StripeApiError

__all__ = ["FAULT_KINDS", "FaultInjector", "RefusalRule", "fault_error"]

FAULT_KINDS = ("409", "429", "500", "503", "timeout")
"""Every kind of random fault the injector can produce."""

_SERVER_ERROR = (
    "Sorry, something went wrong. We've already been notified of the problem, but if you need "
    "any help, you can reach us at support.stripe.com/contact. (Injected by the dualwrite stand-in.)"
)
_RATE_LIMIT = (
    "Request rate limit exceeded. Learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
_LOCK_TIMEOUT = (
    "This object cannot be accessed right now because another API request or Stripe process is "
    "currently accessing it. If you see this error intermittently, retry the request. If you see "
    "this error frequently and are making multiple concurrent requests to a single object, make "
    "your requests serially or at a lower rate. See https://stripe.com/docs/rate-limits for more "
    "details."
)


@dataclass(slots=True)
class RefusalRule:
    """A permanent refusal: requests whose path and parameters match get this error."""

    path: re.Pattern[str]
    where: Mapping[str, str]
    status: int
    type: str
    code: str | None
    message: str
    remaining: int | None

    def matches(self, path: str, flat_params: Mapping[str, str]) -> bool:
        """Whether a request (path, flattened parameters) falls under this rule."""
        if self.remaining == 0 or self.path.fullmatch(path) is None:
            return False
        return all(flat_params.get(key) == value for key, value in self.where.items())


class FaultInjector:
    """Makes a share of calls fail (deterministically per seed) and refuses chosen requests."""

    def __init__(self, *, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._default_seed = seed
        self._rng = random.Random(seed)
        self._rate = 0.0
        self._kinds: tuple[str, ...] = ()
        self._paths: tuple[str, ...] = ("/v1/",)
        self._rules: list[RefusalRule] = []
        self._injected: dict[str, int] = {}
        self.timeout_seconds = 30.0

    def configure(
        self,
        *,
        rate: float,
        kinds: Sequence[str] = ("500", "429", "timeout"),
        paths: Sequence[str] = ("/v1/",),
        seed: int | None = None,
        timeout_seconds: float = 30.0,
    ) -> None:
        """Fail a share ``rate`` of the calls under ``paths``, with a kind drawn from ``kinds``."""
        if not 0.0 <= rate <= 1.0:
            msg = f"faults rate must be between 0 and 1, got {rate!r}"
            raise StandinError(msg)
        unknown = sorted(set(kinds) - set(FAULT_KINDS))
        if unknown or not kinds:
            msg = f"fault kinds must be a non-empty subset of {FAULT_KINDS}, got {list(kinds)!r}"
            raise StandinError(msg)
        if isinstance(paths, str) or not paths:
            msg = f"fault paths must be a non-empty list of path prefixes, got {paths!r}"
            raise StandinError(msg)
        if timeout_seconds < 0:
            msg = f"timeout_seconds must not be negative, got {timeout_seconds!r}"
            raise StandinError(msg)
        with self._lock:
            self._rate = float(rate)
            self._kinds = tuple(kinds)
            self._paths = tuple(paths)
            self._rng = random.Random(self._default_seed if seed is None else seed)
            self.timeout_seconds = float(timeout_seconds)

    def refuse(
        self,
        *,
        path: str,
        where: Mapping[str, str] | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        message: str = "Refused by a dualwrite stand-in rule.",
        count: int | None = None,
    ) -> None:
        """Refuse requests whose path fully matches the regex ``path`` and whose parameters
        (bracket names flattened, e.g. ``payload[stripe_customer_id]``) equal ``where``;
        ``count`` limits how many are refused (None: forever)."""
        try:
            pattern = re.compile(path)
        except re.error as exc:
            msg = f"refuse(path=...) is not a valid regular expression: {path!r} ({exc})"
            raise StandinError(msg) from exc
        if not 400 <= status <= 599 or (count is not None and count < 1):
            msg = f"refuse() needs a 4xx/5xx status and a positive count, got {status}, {count}"
            raise StandinError(msg)
        rule = RefusalRule(pattern, dict(where or {}), status, type, code, message, count)
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        """Stop every random fault and drop every refusal rule (counters are kept)."""
        with self._lock:
            self._rate = 0.0
            self._kinds = ()
            self._rules.clear()

    @property
    def injected(self) -> dict[str, int]:
        """How many faults of each kind (and ``"refused"`` rule hits) were injected so far."""
        with self._lock:
            return dict(self._injected)

    def describe(self) -> dict[str, Any]:
        """The current settings, for ``GET /_standin/state``."""
        with self._lock:
            return {
                "rate": self._rate,
                "kinds": list(self._kinds),
                "paths": list(self._paths),
                "timeout_seconds": self.timeout_seconds,
                "refusal_rules": len([r for r in self._rules if r.remaining != 0]),
                "injected": dict(self._injected),
            }

    def draw(self, path: str) -> str | None:
        """Decide whether this call fails, and how (None: it goes through)."""
        with self._lock:
            if self._rate <= 0.0 or not path.startswith(self._paths):
                return None
            if self._rng.random() >= self._rate:
                return None
            kind = self._rng.choice(self._kinds)
            self._injected[kind] = self._injected.get(kind, 0) + 1
            return kind

    def check_refusals(self, path: str, flat_params: Mapping[str, str]) -> None:
        """Raise the first matching refusal rule's error (and use up one of its count)."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(path, flat_params):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    self._injected["refused"] = self._injected.get("refused", 0) + 1
                    raise StripeApiError(rule.status, rule.message, type=rule.type, code=rule.code)


def fault_error(kind: str) -> StripeApiError:
    """The reply for a rejecting fault kind (every kind but ``timeout``)."""
    if kind in ("500", "503"):
        return StripeApiError(int(kind), _SERVER_ERROR, type="api_error")
    if kind == "429":
        return StripeApiError(
            429, _RATE_LIMIT, code="rate_limit", headers={"Stripe-Should-Retry": "true"}
        )
    return StripeApiError(409, _LOCK_TIMEOUT, code="lock_timeout")
