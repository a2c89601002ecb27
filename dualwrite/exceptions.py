"""Every error dualwrite raises, in one place to avoid import loops.

The tree::

    DualwriteError
    ├── ConfigError            a setting or config file is wrong (names the key, the value and the fix)
    │   └── RedisEvictionError Redis may evict dualwrite's keys (names maxmemory-policy and the fix)
    ├── UsageInputError        a usage request cannot become a UsageEvent (names the field)
    ├── IdempotencyError       an identifier was reused with different parameters
    ├── ConflictError          the same identifier is being recorded right now by another request
    ├── StoreUnavailableError  Redis cannot be reached or answered with an error
    └── PriceError             a Stripe price (or usage) dualwrite cannot turn into an amount

The Stripe stand-in (``stripe_standin``, a package of its own) has its own error, ``StandinError``.
Stripe's own refusals are not exceptions here: writers return them as ``WriteResult`` values
(``dualwrite.models``), so that the engine can record them and hand them back to the caller.
"""

from __future__ import annotations

__all__ = [
    "ClientDisconnectedError",
    "ConfigError",
    "ConflictError",
    "DualwriteError",
    "IdempotencyError",
    "PriceError",
    "RedisEvictionError",
    "StoreUnavailableError",
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


class ConflictError(DualwriteError):
    """Another request with the same identifier is still being recorded; retry later."""


class ClientDisconnectedError(DualwriteError):
    """The caller disconnected before its request body was complete: nothing may be made of it."""


class StoreUnavailableError(DualwriteError):
    """Redis could not be reached, or refused a command."""


class PriceError(DualwriteError):
    """A price cannot be turned into an amount (a field missing or outside what Stripe allows), or
    usage cannot be billed by it; the message names the price and the field."""
