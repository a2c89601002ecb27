"""Every error dualwrite raises, in one place: a leaf any module can import (no import loops).

The tree::

    DualwriteError
    ├── ConfigError               a setting or config file is wrong (names the key, the value, the fix)
    │   └── RedisEvictionError    Redis may evict dualwrite's keys (names maxmemory-policy and the fix)
    ├── UsageInputError           a usage request cannot become a UsageEvent (names the field)
    │   ├── IdempotencyError      an identifier was reused with different parameters
    │   └── FutureTimestampError  a usage timestamp is more than 5 minutes ahead of now
    ├── ConflictError             the same identifier is being recorded right now by another request
    ├── ClientDisconnectedError   the caller left before its request body was complete
    ├── RateLimitedError          a write did not get its turn in time (``retry_after``)
    ├── StoreUnavailableError     Redis cannot be reached or answered with an error
    ├── PriceError                a Stripe price (or usage) dualwrite cannot turn into an amount
    ├── StripeCallError           an operator command's Stripe call failed (``failure``)
    │   ├── CutoverStripeError    ... a cutover's
    │   └── MigrationStripeError  ... a migration command's
    ├── StripeReadError           a reconciliation read failed (``failure``)
    ├── EventSignatureError       a pushed Stripe event's signature does not verify
    ├── EventFetchError           a pushed Stripe event could not be read back from Stripe
    ├── CutoverInputError         a cutover command's input is invalid (also a ValueError)
    ├── BackfillInputError        backfill input is unusable (names the option or the row)
    ├── DeadLetterNotFoundError   no dead letter has that id
    ├── ApiError                  the admin API answers with this status and Stripe-shaped error
    ├── BadQueryError             a report page's query parameter is unusable (also a ValueError)
    ├── UnsendableHeaderError     a caller's header value HTTP/1.1 cannot carry (also a ValueError)
    └── RedisServerError          a test's private redis-server could not be found, started, stopped

Each is re-exported where it is raised, under the name it always had there
(``dualwrite.rate_limits.RateLimitedError``, ``dualwrite.admin.ApiError``, ...), and from ``dualwrite``.
Stripe's own refusals are not exceptions here: writers return them as ``WriteResult`` values
(``dualwrite.models``), so that the engine can record them and hand them back to the caller. The
Stripe stand-in (``stripe_standin``) is a package of its own, and so are its errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dualwrite.models import StripeFailure

__all__ = [
    "ApiError",
    "BackfillInputError",
    "BadQueryError",
    "ClientDisconnectedError",
    "ConfigError",
    "ConflictError",
    "CutoverInputError",
    "CutoverStripeError",
    "DeadLetterNotFoundError",
    "DualwriteError",
    "EventFetchError",
    "EventSignatureError",
    "FutureTimestampError",
    "IdempotencyError",
    "MigrationStripeError",
    "PriceError",
    "RateLimitedError",
    "RedisEvictionError",
    "RedisServerError",
    "StoreUnavailableError",
    "StripeCallError",
    "StripeReadError",
    "UnsendableHeaderError",
    "UsageInputError",
]


class DualwriteError(Exception):
    """Root of every error raised by dualwrite."""


class ConfigError(DualwriteError):
    """A setting is invalid; the message names the key, the value and how to fix it."""


class RedisEvictionError(ConfigError):
    """Redis's ``maxmemory-policy`` can evict dualwrite's keys and ``[redis] allow_eviction`` is
    off; the message names the setting and the fix."""


class UsageInputError(DualwriteError):
    """A usage request is malformed; ``param`` names the offending field, as Stripe does."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "parameter_invalid"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class IdempotencyError(UsageInputError):
    """An identifier (Idempotency-Key) was reused for a different usage event."""

    def __init__(self, message: str):
        super().__init__(message, param=None, code="idempotency_key_reused")


class FutureTimestampError(UsageInputError):
    """A usage ``timestamp`` is further ahead of now than Stripe accepts (``param`` names it)."""


class ConflictError(DualwriteError):
    """Another request with the same identifier is still being recorded; retry later."""


class ClientDisconnectedError(DualwriteError):
    """The caller disconnected before its request body was complete: nothing may be made of it."""


class RateLimitedError(DualwriteError):
    """A write did not get its turn within the allowed wait; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailableError(DualwriteError):
    """Redis could not be reached, or refused a command."""


class PriceError(DualwriteError):
    """A price cannot be turned into an amount (a field missing or outside what Stripe allows), or
    usage cannot be billed by it; the message names the price and the field."""


class StripeCallError(DualwriteError):
    """A command's Stripe call failed: Stripe refused it or was unreachable (``failure`` says
    how), or its answer cannot be used (``failure`` is None)."""

    def __init__(self, message: str, *, failure: StripeFailure | None = None):
        super().__init__(message)
        self.failure = failure


class CutoverStripeError(StripeCallError):
    """Stripe refused a cutover's read or write (or cannot be reached: ``failure`` says how), or
    its answer leaves no period end to cut over at (``failure`` is None)."""


class MigrationStripeError(StripeCallError):
    """Stripe refused a call of a migration command (or the network failed); ``failure`` says how."""


class StripeReadError(DualwriteError):
    """Stripe refused a read (or the network failed); ``failure`` says how."""

    def __init__(self, message: str, *, failure: StripeFailure):
        super().__init__(message)
        self.failure = failure


class EventSignatureError(DualwriteError):
    """A pushed event's Stripe-Signature does not verify with the configured secret."""


class EventFetchError(DualwriteError):
    """The full event could not be read from Stripe (answer 5xx: Stripe delivers it again)."""


class CutoverInputError(DualwriteError, ValueError):
    """A cutover command's input is invalid; the message names it and the fix."""


class BackfillInputError(DualwriteError):
    """Backfill input is unusable; the message names the option or the row and column."""


class DeadLetterNotFoundError(DualwriteError):
    """No dead letter has that id (it was retried or dropped, or never existed)."""


class ApiError(DualwriteError):
    """Answer an admin API request with Stripe's error shape: ``status``, ``message``, ``param``
    (and the error's ``type`` and ``code`` when not the default ``invalid_request_error``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        error_type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type
        self.code = code


class BadQueryError(DualwriteError, ValueError):
    """A query parameter has a value the page cannot use (the message says which and why)."""


class UnsendableHeaderError(DualwriteError, ValueError):
    """A caller's header value holds a character HTTP/1.1 cannot carry."""


class RedisServerError(DualwriteError):
    """A private redis-server could not be found, started or stopped."""
