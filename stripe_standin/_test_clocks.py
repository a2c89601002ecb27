"""Stripe's test clocks: a frozen time per clock that the objects on it live by.

As Stripe has them (docs.stripe.com/billing/testing/test-clocks and the API reference, schema
``test_helpers.test_clock`` in the vendored spec): ``POST /v1/test_helpers/test_clocks`` creates a
clock at ``frozen_time`` (optionally ``name``d); customers created with ``test_clock`` live on it,
and so do their subscriptions (``subscription.test_clock``): their periods, their usage record
timestamps ("now", "not in the future", "inside the current period") and their schedules' phases
follow the clock's frozen time, not the stand-in's. ``POST …/{id}/advance`` starts moving the
clock: the reply says ``advancing`` with the old ``frozen_time`` and
``status_details.advancing.target_frozen_time``; once done (after
``StripeStandin.test_clock_advance_seconds`` of real time, 0 by default: at the next call) the
clock is ``ready`` at the new time, periods have rolled over and due schedule phases are applied.
``DELETE …/{id}`` deletes the clock and the customers, subscriptions and items on it.

Advance rules from the spec's description: the new time must be after the current one, and at
most two intervals of the shortest subscription on the clock ahead (two years with none).
UNVERIFIED: the wording of the refusals, and that meter events of a customer on a clock have
their 35-day/5-minute window (and their default timestamp) on the clock's time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from stripe_standin._calendar import boundary
from stripe_standin._errors import invalid, no_such
from stripe_standin._objects import paginate, render_test_clock
from stripe_standin._params import Param, expand, integer, string, timestamp
from stripe_standin._state import Call, Store, TestClock

__all__ = [
    "TEST_CLOCK_ENDPOINTS",
    "advance_test_clock",
    "create_test_clock",
    "delete_test_clock",
    "list_test_clocks",
    "retrieve_test_clock",
    "settle_test_clocks",
]

LIFETIME = 7 * 86_400
"""A clock's ``deletes_after`` is this long after its creation (Stripe's examples: 7 days)."""


def settle_test_clocks(store: Store, *, monotonic_now: float | None = None) -> None:
    """Finish every advance whose time has come (call with ``store.lock`` held)."""
    at = time.monotonic() if monotonic_now is None else monotonic_now
    for clock in store.test_clocks.values():
        if clock.status == "advancing" and clock.target is not None and at >= clock.ready_at:
            clock.frozen_time, clock.status, clock.target = clock.target, "ready", None


def _clock(store: Store, call: Call) -> TestClock:
    clock = store.test_clocks.get(call.path_args["id"])
    if clock is None:
        raise no_such("test_helpers.test_clock", call.path_args["id"])
    return clock


def create_test_clock(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/test_helpers/test_clocks."""
    p = call.params
    clock = TestClock(
        id=store.new_id("clock", 24),
        created=call.now,
        deletes_after=call.now + LIFETIME,
        frozen_time=p["frozen_time"],
        name=p.get("name"),
    )
    if "customer" in p:
        customer = store.customers.get(p["customer"])
        if customer is None:
            raise no_such("customer", p["customer"], param="customer")
        if customer.test_clock is not None:
            msg = f"Customer {customer.id} is already attached to test clock {customer.test_clock}."
            raise invalid(msg, param="customer")
        if any(sub.customer == customer.id for sub in store.subscriptions.values()):
            msg = "Only a customer without subscriptions can be attached to a test clock."
            raise invalid(msg, param="customer")
        customer.test_clock = clock.id
    store.test_clocks[clock.id] = clock
    return render_test_clock(clock)


def retrieve_test_clock(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/test_helpers/test_clocks/{id}."""
    return render_test_clock(_clock(store, call))


def list_test_clocks(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/test_helpers/test_clocks (newest first)."""
    found = [render_test_clock(c) for c in reversed(store.test_clocks.values())]
    return paginate(found, call.params, call.path, "test clock")


def _furthest(store: Store, clock: TestClock) -> int:
    """How far the clock may move: two intervals of its shortest subscription, else two years."""
    subs = [sub for sub in store.subscriptions.values() if sub.test_clock == clock.id]
    if not subs:
        return boundary(clock.frozen_time, "year", 1, 2)
    return min(boundary(clock.frozen_time, s.interval, s.interval_count, 2) for s in subs)


def advance_test_clock(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/test_helpers/test_clocks/{id}/advance: start moving the clock forward."""
    clock = _clock(store, call)
    target: int = call.params["frozen_time"]
    if clock.status != "ready":
        msg = f"Test clock {clock.id} is {clock.status}: wait until it is ready to advance it."
        raise invalid(msg, param="frozen_time")
    if target <= clock.frozen_time:
        msg = (
            f"The frozen_time must be after the test clock's current frozen time "
            f"({clock.frozen_time})."
        )
        raise invalid(msg, param="frozen_time")
    furthest = _furthest(store, clock)
    if target > furthest:
        msg = (
            "Cannot advance more than two intervals of the shortest subscription on this test "
            f"clock (or two years without one): frozen_time may be at most {furthest}."
        )
        raise invalid(msg, param="frozen_time")
    clock.status, clock.target = "advancing", target
    clock.ready_at = time.monotonic() + store.advance_seconds
    return render_test_clock(clock)


def delete_test_clock(store: Store, call: Call) -> dict[str, Any]:
    """DELETE /v1/test_helpers/test_clocks/{id}: the clock and the objects living on it."""
    clock = _clock(store, call)
    for customer in [c for c in store.customers.values() if c.test_clock == clock.id]:
        del store.customers[customer.id]
    for sub in [s for s in store.subscriptions.values() if s.test_clock == clock.id]:
        for item_id in sub.items:
            store.items.pop(item_id, None)
        if sub.schedule is not None:
            store.schedules.pop(sub.schedule, None)
        del store.subscriptions[sub.id]
    del store.test_clocks[clock.id]
    return {"id": clock.id, "object": "test_helpers.test_clock", "deleted": True}


_PAGE: Mapping[str, Param] = {
    "limit": integer(minimum=1, maximum=100),
    "starting_after": string(),
    "ending_before": string(),
    "expand": expand(),
}

TEST_CLOCK_ENDPOINTS: tuple[tuple[str, str, Mapping[str, Param], Any], ...] = (
    (
        "POST",
        "/v1/test_helpers/test_clocks",
        {
            "frozen_time": timestamp(required=True),
            "name": string(max_length=300),
            "customer": string(),
            "expand": expand(),
        },
        create_test_clock,
    ),
    ("GET", "/v1/test_helpers/test_clocks", _PAGE, list_test_clocks),
    ("GET", "/v1/test_helpers/test_clocks/{id}", {"expand": expand()}, retrieve_test_clock),
    ("DELETE", "/v1/test_helpers/test_clocks/{id}", {}, delete_test_clock),
    (
        "POST",
        "/v1/test_helpers/test_clocks/{id}/advance",
        {"frozen_time": timestamp(required=True), "expand": expand()},
        advance_test_clock,
    ),
)
"""The test clock endpoints, as ``_endpoints._TABLE`` rows (method, path, parameters, handler)."""
