"""A local Stripe stand-in for tests, benchmarks and the demo.

``StripeStandin`` is a Starlette app that speaks Stripe's wire format for what dualwrite needs:
customers, products, prices, subscriptions and their items, legacy usage records (with their
per-period summaries) and Billing Meters (meters, meter events, cancellations, event summaries,
and API v2's meter event sessions and stream). It keeps Stripe's idempotency rules, refuses
unknown and missing parameters with Stripe's error codes, runs on a movable clock, can inject
faults, and reports late refusals of meter events as Stripe does: signed thin events
(``v1.billing.meter.error_report_triggered``) POSTed to event destinations::

    from stripe_standin import StripeStandin, serve_standin

    standin = StripeStandin()
    with serve_standin(standin) as running:
        client = stripe.StripeClient(
            "sk_test_123", base_addresses={"api": running.url, "meter_events": running.url}
        )
        ...
        assert standin.meter_total("cus_…", "api_calls") == 42
        with serve_app(my_webhook_receiver) as receiver_url:  # any ASGI app, in a thread
            standin.add_event_destination(f"{receiver_url}/hook", "whsec_…")
            standin.report_meter_errors()  # thin events for what was refused since last time

Control it from another process over HTTP under ``/_standin/`` (see ``GET /_standin/state``).

The package is the judge of dualwrite's tests, so it shares no code with dualwrite: it is a
package of its own in the same repository (``dualwrite.testing`` re-exports it).
"""

from __future__ import annotations

from stripe_standin._app import RequestLogEntry
from stripe_standin._clock import StandinClock
from stripe_standin._errors import StandinError
from stripe_standin._faults import FAULT_KINDS, FaultInjector
from stripe_standin._meters import ASYNC_ERROR_CODES
from stripe_standin._server import RunningStandin, run_standin, serve_app, serve_standin
from stripe_standin._setup import legacy_price_params, meter_params
from stripe_standin._standin import StripeStandin
from stripe_standin.checking import SpecChecker

__all__ = [
    "ASYNC_ERROR_CODES",
    "FAULT_KINDS",
    "FaultInjector",
    "RequestLogEntry",
    "RunningStandin",
    "SpecChecker",
    "StandinClock",
    "StandinError",
    "StripeStandin",
    "legacy_price_params",
    "meter_params",
    "run_standin",
    "serve_app",
    "serve_standin",
]
