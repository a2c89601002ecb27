"""A local Stripe stand-in for tests, benchmarks and the demo.

``StripeStandin`` is a Starlette app that speaks Stripe's wire format for what dualwrite needs:
customers, products, prices, subscriptions and their items, legacy usage records (with their
per-period summaries) and Billing Meters (meters, meter events, cancellations, event summaries). It
keeps Stripe's idempotency rules, refuses unknown and missing parameters with Stripe's error codes,
runs on a movable clock, and can inject faults::

    from dualwrite.testing import StripeStandin, serve_standin

    standin = StripeStandin()
    with serve_standin(standin) as running:
        client = stripe.StripeClient(
            "sk_test_123", base_addresses={"api": running.url, "meter_events": running.url}
        )
        ...
        assert standin.meter_total("cus_…", "api_calls") == 42

Control it from another process over HTTP under ``/_standin/`` (see ``GET /_standin/state``).
"""

from __future__ import annotations

from dualwrite.testing._app import RequestLogEntry
from dualwrite.testing._clock import StandinClock
from dualwrite.testing._faults import FAULT_KINDS, FaultInjector
from dualwrite.testing._server import RunningStandin, run_standin, serve_standin
from dualwrite.testing._standin import StripeStandin

__all__ = [
    "FAULT_KINDS",
    "FaultInjector",
    "RequestLogEntry",
    "RunningStandin",
    "StandinClock",
    "StripeStandin",
    "run_standin",
    "serve_standin",
]
