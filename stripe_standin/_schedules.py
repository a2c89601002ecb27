"""Subscription schedules in the stand-in: what Stripe's migration guide uses to move an item to a
meter-backed price at the end of the billing period.

Implemented: ``POST /v1/subscription_schedules`` with ``from_subscription`` (one phase: the
subscription as it is, for its current period), ``GET`` and ``POST /v1/subscription_schedules/{id}``
(replacing the phases, as Stripe's update does), and ``POST …/{id}/release``. Phases take effect
on the stand-in's clock: before each API call, every phase whose ``start_date`` has passed is
applied to its subscription (items whose price is not in the phase move to the phase's new
price), and a schedule past its last phase ends by its ``end_behavior``. Creating a schedule from
``customer`` and ``phases`` (a new subscription) is not implemented and answers 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stripe_standin._calendar import boundary
from stripe_standin._errors import invalid, no_such
from stripe_standin._params import (
    Param,
    boolean,
    expand,
    integer,
    lst,
    metadata,
    obj,
    string,
    timestamp,
)
from stripe_standin._state import Call, Store, Subscription, is_basil_or_later

__all__ = [
    "SCHEDULE_ENDPOINTS",
    "Phase",
    "Schedule",
    "apply_due_phases",
    "create_schedule",
    "release_schedule",
    "render_schedule",
    "retrieve_schedule",
    "update_schedule",
]

_END_BEHAVIORS = ("cancel", "none", "release", "renew")
_PRORATION = ("always_invoice", "create_prorations", "none")


@dataclass(slots=True)
class Phase:
    """One phase: from ``start`` to ``end``, the subscription holds these prices."""

    start: int
    end: int
    items: list[dict[str, Any]]
    proration_behavior: str = "create_prorations"
    metadata: dict[str, str] = field(default_factory=dict)
    applied: bool = False


@dataclass(slots=True)
class Schedule:
    """A subscription schedule."""

    id: str
    created: int
    customer: str
    subscription: str
    phases: list[Phase]
    end_behavior: str = "release"
    status: str = "active"
    metadata: dict[str, str] = field(default_factory=dict)
    released_at: int | None = None
    completed_at: int | None = None
    test_clock: str | None = None
    """Its subscription's test clock: its phases start and end on that clock's time."""

    def now(self, store: Store, now: int) -> int:
        """The schedule's "now": its test clock's frozen time, else ``now``."""
        return store.time_on(self.test_clock, now)


def _schedule(store: Store, call: Call) -> Schedule:
    schedule: Schedule | None = store.schedules.get(call.path_args["id"])
    if schedule is None:
        raise no_such("subscription_schedule", call.path_args["id"])
    return schedule


def _current_items(store: Store, sub: Subscription) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for item_id in sub.items:
        item = store.items[item_id]
        entry: dict[str, Any] = {"price": item.price}
        if item.quantity is not None:
            entry["quantity"] = item.quantity
        items.append(entry)
    return items


def create_schedule(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/subscription_schedules (``from_subscription`` only)."""
    p = call.params
    if "from_subscription" not in p:
        msg = (
            "This stand-in creates subscription schedules from an existing subscription only: "
            "pass from_subscription."
        )
        raise invalid(msg, param="from_subscription")
    sub = store.subscriptions.get(p["from_subscription"])
    if sub is None:
        raise no_such("subscription", p["from_subscription"], param="from_subscription")
    if sub.schedule is not None:
        msg = (
            "You cannot migrate a subscription that is already attached to a schedule: "
            f"`{sub.schedule}`."
        )
        raise invalid(msg, param="from_subscription")
    now = store.time_of(sub, call.now)
    start, end = sub.period(now)
    schedule = Schedule(
        id=store.new_id("sub_sched", 24),
        created=now,
        customer=sub.customer,
        subscription=sub.id,
        phases=[Phase(start, end, _current_items(store, sub), applied=True)],
        end_behavior=p.get("end_behavior", "release"),
        metadata=dict(p.get("metadata") or {}),
        test_clock=sub.test_clock,
    )
    store.schedules[schedule.id] = schedule
    sub.schedule = schedule.id
    return render_schedule(schedule, now, call.version)


def retrieve_schedule(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/subscription_schedules/{id}."""
    schedule = _schedule(store, call)
    return render_schedule(schedule, schedule.now(store, call.now), call.version)


def _phase(
    store: Store, call: Call, sub: Subscription, raw: Mapping[str, Any], index: int, start: int
) -> Phase:
    where = f"phases[{index}]"
    entries: list[dict[str, Any]] = list(raw.get("items") or [])
    if not entries:
        raise invalid(f"Missing required param: {where}[items].", param=f"{where}[items]")
    for number, entry in enumerate(entries):
        price = store.prices.get(entry["price"])
        param = f"{where}[items][{number}][price]"
        if price is None:
            raise no_such("price", entry["price"], param=param)
        if price.legacy_metered and is_basil_or_later(call.version):
            msg = (
                "Legacy metered prices (metered without a meter) cannot be attached to "
                "subscription schedules on API version 2025-03-31.basil or later."
            )
            raise invalid(msg, param=param)
        if (price.interval, price.interval_count) != (sub.interval, sub.interval_count):
            msg = "The price's interval must match the other items' interval on this subscription."
            raise invalid(msg, param=param)
    end = raw.get("end_date")
    if end is None:
        end = _phase_end(sub, start, raw.get("iterations", 1))
    if end <= start:
        msg = f"The end_date of {where} must be after its start_date."
        raise invalid(msg, param=f"{where}[end_date]")
    return Phase(
        start=start,
        end=int(end),
        items=[dict(entry) for entry in entries],
        proration_behavior=raw.get("proration_behavior", "create_prorations"),
        metadata=dict(raw.get("metadata") or {}),
    )


def _phase_end(sub: Subscription, start: int, iterations: int) -> int:
    """Where a phase of ``iterations`` billing periods ends. From a period boundary it ends on the
    subscription's own boundaries, counted from its anchor (docs.stripe.com/billing/subscriptions/
    billing-cycle: anchored on Jan 31, the period after Feb 28 ends on Mar 31, not Mar 28); from
    elsewhere, ``iterations`` intervals after its start (UNVERIFIED: Stripe's rule there)."""
    if sub.period(start)[0] != start:
        return boundary(start, sub.interval, sub.interval_count, iterations)
    end = start
    for _ in range(iterations):
        end = sub.period(end)[1]
    return end


def update_schedule(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/subscription_schedules/{id}: replace the phases, end behaviour or metadata."""
    schedule = _schedule(store, call)
    p = call.params
    if schedule.status not in ("active", "not_started"):
        msg = (
            f"You cannot update a subscription schedule that is currently in the "
            f"`{schedule.status}` status."
        )
        raise invalid(msg)
    sub = store.subscriptions[schedule.subscription]
    now = schedule.now(store, call.now)
    if "phases" in p:
        raws: list[dict[str, Any]] = list(p["phases"])
        if not raws:
            raise invalid("Missing required param: phases.", param="phases")
        current = next((ph for ph in schedule.phases if ph.start <= now < ph.end), None)
        phases: list[Phase] = []
        start = int(raws[0].get("start_date", current.start if current else now))
        if current is not None and start != current.start:
            msg = (
                "You can not modify the start date of the current phase: it must stay "
                f"{current.start}."
            )
            raise invalid(msg, param="phases[0][start_date]")
        for index, raw in enumerate(raws):
            given = raw.get("start_date")
            if index and given is not None and int(given) != start:
                msg = f"The start_date of phases[{index}] must equal the end_date of the phase before."
                raise invalid(msg, param=f"phases[{index}][start_date]")
            phase = _phase(store, call, sub, raw, index, start)
            phase.applied = current is not None and phase.start == current.start
            phases.append(phase)
            start = phase.end
        schedule.phases = phases
    if "end_behavior" in p:
        schedule.end_behavior = p["end_behavior"]
    if "metadata" in p:
        schedule.metadata.update(p["metadata"])
    return render_schedule(schedule, now, call.version)


def release_schedule(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/subscription_schedules/{id}/release: the subscription stays as it is, unscheduled."""
    schedule = _schedule(store, call)
    if schedule.status not in ("active", "not_started"):
        msg = (
            f"You cannot release a subscription schedule that is currently in the "
            f"`{schedule.status}` status."
        )
        raise invalid(msg)
    now = schedule.now(store, call.now)
    _release(store, schedule, now)
    return render_schedule(schedule, now, call.version)


def _release(store: Store, schedule: Schedule, now: int) -> None:
    schedule.status, schedule.released_at = "released", now
    sub = store.subscriptions.get(schedule.subscription)
    if sub is not None and sub.schedule == schedule.id:
        sub.schedule = None


def _apply(store: Store, sub: Subscription, phase: Phase) -> None:
    """Give the subscription the phase's prices: an item whose price left moves to a new one."""
    wanted = [entry["price"] for entry in phase.items]
    held = {store.items[item_id].price for item_id in sub.items}
    arriving = [price for price in wanted if price not in held]
    for item_id in sub.items:
        item = store.items[item_id]
        if item.price in wanted or not arriving:
            continue
        current = store.prices[item.price]
        if current.legacy_metered:
            item.legacy_price = current.id
        item.move_to(arriving.pop(0), phase.start)
        if store.prices[item.price].usage_type == "metered":
            item.quantity = None
    phase.applied = True


def apply_due_phases(store: Store, real_now: int) -> None:
    """Apply every phase that has started, and end schedules past their last phase, each on its
    own time (a test clock's, else ``real_now``; call with ``store.lock`` held)."""
    for schedule in store.schedules.values():
        if schedule.status != "active":
            continue
        sub = store.subscriptions.get(schedule.subscription)
        if sub is None:
            continue
        now = schedule.now(store, real_now)
        for phase in schedule.phases:
            if not phase.applied and phase.start <= now:
                _apply(store, sub, phase)
        if schedule.phases and now >= schedule.phases[-1].end:
            if schedule.end_behavior == "release":
                _release(store, schedule, schedule.phases[-1].end)
            else:
                schedule.status, schedule.completed_at = "completed", schedule.phases[-1].end
                sub.schedule = None


BILLING_MODE_SINCE = "2025-04"
"""Versions from here on show a schedule's ``billing_mode`` and ``pause_schedules`` (and a
subscription its ``billing_mode`` and ``billing_schedules``): stripe-python
16.1 (2026-10-28.endive) requires them, 12.0 (2025-03-31.basil) has neither; the exact version
between the two that added them is not known here."""


def render_schedule(schedule: Schedule, now: int, version: str = "") -> dict[str, Any]:
    """A ``subscription_schedule`` (as Stripe shows it to a caller of ``version``)."""
    current = next(
        (
            {"start_date": ph.start, "end_date": ph.end}
            for ph in schedule.phases
            if schedule.status == "active" and ph.start <= now < ph.end
        ),
        None,
    )
    rendered: dict[str, Any] = {
        "id": schedule.id,
        "object": "subscription_schedule",
        "application": None,
        "canceled_at": None,
        "completed_at": schedule.completed_at,
        "created": schedule.created,
        "current_phase": current,
        "customer": schedule.customer,
        "default_settings": {
            "application_fee_percent": None,
            "billing_cycle_anchor": "automatic",
            "collection_method": "charge_automatically",
            "default_payment_method": None,
            "description": None,
            "invoice_settings": {"issuer": {"type": "self"}},
            "on_behalf_of": None,
            "transfer_data": None,
        },
        "end_behavior": schedule.end_behavior,
        "livemode": False,
        "metadata": dict(schedule.metadata),
        "phases": [
            {
                "add_invoice_items": [],
                "application_fee_percent": None,
                "billing_cycle_anchor": None,
                "collection_method": None,
                "currency": "usd",
                "default_payment_method": None,
                "default_tax_rates": [],
                "description": None,
                "discounts": [],
                "end_date": phase.end,
                "invoice_settings": None,
                "items": [
                    {
                        "discounts": [],
                        "metadata": {},
                        "plan": entry["price"],
                        "price": entry["price"],
                        "quantity": entry.get("quantity"),
                        "tax_rates": [],
                    }
                    for entry in phase.items
                ],
                "metadata": dict(phase.metadata),
                "on_behalf_of": None,
                "proration_behavior": phase.proration_behavior,
                "start_date": phase.start,
                "transfer_data": None,
                "trial_end": None,
            }
            for phase in schedule.phases
        ],
        "released_at": schedule.released_at,
        "released_subscription": schedule.subscription if schedule.status == "released" else None,
        "status": schedule.status,
        "subscription": schedule.subscription if schedule.status == "active" else None,
        "test_clock": schedule.test_clock,
    }
    if version[:7] >= BILLING_MODE_SINCE:
        rendered["billing_mode"] = {"flexible": None, "type": "classic", "updated_at": None}
        rendered["pause_schedules"] = []
    return rendered


_PHASE: dict[str, Param] = {
    "items": lst(
        obj(
            {"price": string(required=True), "quantity": integer(minimum=0), "metadata": metadata()}
        ),
        required=True,
    ),
    "start_date": timestamp(),
    "end_date": timestamp(),
    "iterations": integer(minimum=1),
    "proration_behavior": string(choices=_PRORATION),
    "metadata": metadata(),
}

SCHEDULE_ENDPOINTS: tuple[tuple[str, str, Mapping[str, Param], Any], ...] = (
    (
        "POST",
        "/v1/subscription_schedules",
        {
            "from_subscription": string(),
            "end_behavior": string(choices=_END_BEHAVIORS),
            "metadata": metadata(),
            "expand": expand(),
        },
        create_schedule,
    ),
    ("GET", "/v1/subscription_schedules/{id}", {"expand": expand()}, retrieve_schedule),
    (
        "POST",
        "/v1/subscription_schedules/{id}",
        {
            "phases": lst(obj(_PHASE)),
            "end_behavior": string(choices=_END_BEHAVIORS),
            "proration_behavior": string(choices=_PRORATION),
            "metadata": metadata(),
            "expand": expand(),
        },
        update_schedule,
    ),
    (
        "POST",
        "/v1/subscription_schedules/{id}/release",
        {"preserve_cancel_date": boolean(), "expand": expand()},
        release_schedule,
    ),
)
"""The schedule endpoints, as ``_endpoints._TABLE`` rows (method, path, parameters, handler)."""
