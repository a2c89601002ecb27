"""Billing meters, meter events, cancellations and event summaries.

v1 meter events are checked synchronously for what Stripe refuses at once (timestamp window, value
format, a duplicate identifier) and otherwise accepted. What Stripe only finds later (no meter, no
customer key, unknown customer) is accepted too, not counted, and kept in ``Store.async_errors``,
from which ``_notifications`` builds the error reports Stripe sends to event destinations. The v2
stream (``_streams``) reuses the same checks, all of them asynchronous there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from stripe_standin._calendar import (
    DAY,
    MAX_EVENT_AGE,
    MAX_EVENT_LEAD,
    is_aligned,
    meter_event_problem,
)
from stripe_standin._errors import StripeApiError, invalid, missing_param, no_such
from stripe_standin._objects import (
    paginate,
    render_event_summary,
    render_meter,
    render_meter_event,
    render_meter_event_adjustment,
)
from stripe_standin._state import Call, Meter, MeterEvent, Store

__all__ = [
    "ASYNC_ERROR_CODES",
    "IDENTIFIER_WINDOW",
    "Refusal",
    "aggregate",
    "aggregate_exact",
    "create_adjustment",
    "create_meter",
    "create_meter_event",
    "deactivate_meter",
    "event_time",
    "find_meter",
    "list_event_summaries",
    "list_meters",
    "reactivate_meter",
    "read_value",
    "record_async_error",
    "resolve",
    "retrieve_meter",
    "timestamp_refusal",
]

IDENTIFIER_WINDOW = DAY
"""Identifiers are unique for (at least) 24 hours; cancellations work within 24 hours."""
MAX_DIGITS = 15
"""Values may have at most 15 significant digits (API 2026-04-22.dahlia)."""
MAX_WINDOWS = 10_000
"""The stand-in's cap on the windows one summaries request may cover."""
_WINDOW_SECONDS = {"hour": 3_600, "day": DAY}

ASYNC_ERROR_CODES = (
    "archived_meter",
    "meter_event_customer_not_found",
    "meter_event_invalid_value",
    "meter_event_no_customer_defined",
    "meter_event_value_too_many_digits",
    "no_meter",
    "timestamp_in_future",
    "timestamp_too_far_in_past",
)
"""The codes of Stripe's asynchronous meter event errors that the stand-in produces (stripe-python
16.1 ``V1BillingMeterErrorReportTriggeredEvent`` also lists ``meter_event_dimension_count_too_high``
and ``missing_dimension_payload_keys``, for dimensions the stand-in does not model)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a meter event is refused: an async error ``code`` and a ``message``."""

    code: str
    message: str


def find_meter(store: Store, event_name: str) -> Meter | None:
    """The active meter for ``event_name``, else the newest inactive one, else None."""
    named = [m for m in store.meters.values() if m.event_name == event_name]
    active = [m for m in named if m.status == "active"]
    candidates = active or named
    return candidates[-1] if candidates else None


def _get_meter(store: Store, meter_id: str) -> Meter:
    meter = store.meters.get(meter_id)
    if meter is None:
        raise no_such("billing meter", meter_id)
    return meter


def _check_unique(store: Store, event_name: str, meter_id: str | None = None) -> None:
    for other in store.meters.values():
        if other.event_name == event_name and other.status == "active" and other.id != meter_id:
            # UNVERIFIED wording; Stripe documents that an event name belongs to one meter.
            msg = f"An active meter with event_name `{event_name}` already exists: {other.id}."
            raise invalid(msg, param="event_name", code="resource_already_exists")


def create_meter(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/billing/meters."""
    p = call.params
    _check_unique(store, p["event_name"])
    meter = Meter(
        id=store.new_id("mtr_test", 24),
        created=call.now,
        updated=call.now,
        display_name=p["display_name"],
        event_name=p["event_name"],
        formula=p["default_aggregation"]["formula"],
        customer_key=p.get("customer_mapping", {}).get("event_payload_key", "stripe_customer_id"),
        value_key=p.get("value_settings", {}).get("event_payload_key", "value"),
        event_time_window=p.get("event_time_window"),
    )
    store.meters[meter.id] = meter
    return render_meter(meter)


def retrieve_meter(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/billing/meters/{id}."""
    return render_meter(_get_meter(store, call.path_args["id"]))


def list_meters(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/billing/meters (optional ``status`` filter)."""
    status = call.params.get("status")
    found = [m for m in reversed(store.meters.values()) if status in (None, m.status)]
    return paginate([render_meter(m) for m in found], call.params, call.path, "billing meter")


def deactivate_meter(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/billing/meters/{id}/deactivate: events for it are no longer counted."""
    meter = _get_meter(store, call.path_args["id"])
    meter.status, meter.deactivated_at, meter.updated = "inactive", call.now, call.now
    return render_meter(meter)


def reactivate_meter(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/billing/meters/{id}/reactivate."""
    meter = _get_meter(store, call.path_args["id"])
    _check_unique(store, meter.event_name, meter.id)
    meter.status, meter.deactivated_at, meter.updated = "active", None, call.now
    return render_meter(meter)


def read_value(raw: str, key: str) -> Decimal | Refusal:
    """The event's value, or why it is refused: not a whole number, or over 15 digits."""
    try:
        value = Decimal(raw)
    except InvalidOperation:
        value = Decimal("NaN")
    # UNVERIFIED wording: Stripe's docs say values must be whole numbers, not what it answers.
    if not value.is_finite() or value != value.to_integral_value():
        msg = f"Invalid payload[{key}]: meter event values must be whole numbers."
        return Refusal("meter_event_invalid_value", msg)
    if len(str(abs(int(value))).lstrip("0")) > MAX_DIGITS:
        # Stripe's wording (changelog: dahlia/2026-04-22/billing-meter-event-values-validation).
        # Stripe applies it from that API version on; the stand-in applies it to every version.
        msg = (
            f"The value in the event payload can have at most {MAX_DIGITS} digits. Received {raw}."
        )
        return Refusal("meter_event_value_too_many_digits", msg)
    return value


def timestamp_refusal(ts: int, now: int) -> Refusal | None:
    """Why ``ts`` is outside the window (35 days back, 5 minutes ahead: ``_calendar``), or None."""
    problem = meter_event_problem(ts, now=now)
    if problem == "too_old":
        # Stripe's wording (the-answerai/theanswer#624).
        msg = (
            "The event timestamp cannot be more than 35 days in past. Expected a timestamp "
            f"greater than or equal to {now - MAX_EVENT_AGE}."
        )
        return Refusal("timestamp_too_far_in_past", msg)
    if problem == "future":
        # UNVERIFIED wording, modelled on the 35-day message above.
        msg = (
            "The event timestamp cannot be more than 5 minutes in the future. Expected a "
            f"timestamp less than or equal to {now + MAX_EVENT_LEAD}."
        )
        return Refusal("timestamp_in_future", msg)
    return None


def record_async_error(
    store: Store, event: MeterEvent, refusal: Refusal, *, at: int | None = None
) -> None:
    """Keep a refusal for the next error report (``at``: when it was found; default: ingestion)."""
    store.async_errors.append(
        {
            "code": refusal.code,
            "identifier": event.identifier,
            "event_name": event.event_name,
            "meter": event.meter,
            "message": refusal.message,
            "created": event.created if at is None else at,
        }
    )


def event_time(store: Store, meter: Meter | None, payload: dict[str, str], now: int) -> int:
    """The "now" an event's timestamp is judged by: its customer's test clock's frozen time, else
    ``now`` (UNVERIFIED for test clocks: ``_test_clocks``)."""
    key = meter.customer_key if meter is not None else "stripe_customer_id"
    customer = store.customers.get(payload.get(key, ""))
    return store.time_on(customer.test_clock if customer is not None else None, now)


def create_meter_event(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/billing/meter_events."""
    p = call.params
    now = call.now
    event_name: str = p["event_name"]
    payload: dict[str, str] = p["payload"]
    meter = find_meter(store, event_name)
    at = event_time(store, meter, payload, now)
    ts: int = p.get("timestamp", at)
    late = timestamp_refusal(ts, at)
    if late is not None:
        raise invalid(late.message, param="timestamp")
    value_key = meter.value_key if meter is not None else "value"
    value = None
    if value_key in payload and (meter is None or meter.formula != "count"):
        read = read_value(payload[value_key], value_key)
        if isinstance(read, Refusal):
            raise invalid(read.message, param=f"payload[{value_key}]")
        value = read
    identifier = p.get("identifier") or store.new_uuid()
    previous = store.events_by_identifier.get(identifier)
    if previous is not None and previous.created > now - IDENTIFIER_WINDOW:
        # Stripe's reply (langfuse/langfuse#16292): 400, no error code, not retryable.
        raise StripeApiError(
            400,
            f"An event already exists with identifier {identifier}.",
            headers={"Stripe-Should-Retry": "false"},
        )
    event = MeterEvent(identifier, event_name, dict(payload), ts, now, len(store.events))
    resolve(store, event, meter, value)
    store.events.append(event)
    store.events_by_identifier[identifier] = event
    return render_meter_event(event)


def resolve(
    store: Store,
    event: MeterEvent,
    meter: Meter | None,
    value: Decimal | None,
    problem: Refusal | None = None,
) -> None:
    """Stripe's asynchronous checks, done at once: count the event or record why not.

    ``problem`` is a refusal found before (the v2 stream checks timestamps and values late too).
    """
    if meter is None:
        # UNVERIFIED wording.
        msg = f"No meter was found for event name `{event.event_name}`."
        record_async_error(store, event, Refusal("no_meter", msg))
        return
    event.meter = meter.id
    if meter.status != "active":
        msg = f"Meter {meter.id} is deactivated."  # UNVERIFIED wording.
        record_async_error(store, event, Refusal("archived_meter", msg))
        return
    if problem is not None:
        record_async_error(store, event, problem)
        return
    customer = event.payload.get(meter.customer_key)
    if not customer:
        # Stripe's wording (the sample error in docs.stripe.com/api/v2/core/events/object).
        msg = f"Customer mapping key {meter.customer_key} not found in payload."
        record_async_error(store, event, Refusal("meter_event_no_customer_defined", msg))
        return
    event.customer = customer
    if customer not in store.customers:
        msg = f"No customer found with id `{customer}`."  # UNVERIFIED wording.
        record_async_error(store, event, Refusal("meter_event_customer_not_found", msg))
        return
    if value is None and meter.formula != "count":
        # UNVERIFIED wording.
        msg = f"Value mapping key {meter.value_key} not found in payload."
        record_async_error(store, event, Refusal("meter_event_invalid_value", msg))
        return
    event.value = value
    event.counted = True


def aggregate(meter: Meter, events: Iterable[MeterEvent]) -> float:
    """The meter's formula over counted, non-cancelled events (newest per window if windowed)."""
    return float(aggregate_exact(meter, events))


def aggregate_exact(meter: Meter, events: Iterable[MeterEvent]) -> Decimal:
    """``aggregate``, exactly (what an invoice bills)."""
    kept = [e for e in events if e.counted and not e.cancelled]
    if meter.event_time_window is not None:
        width = _WINDOW_SECONDS[meter.event_time_window]
        newest: dict[int, MeterEvent] = {}
        for event in kept:
            slot = event.timestamp // width
            if slot not in newest or event.seq > newest[slot].seq:
                newest[slot] = event
        kept = list(newest.values())
    if meter.formula == "count":
        return Decimal(len(kept))
    if not kept:
        return Decimal(0)
    if meter.formula == "last":
        return max(kept, key=lambda e: (e.timestamp, e.seq)).value or Decimal(0)
    return sum((e.value or Decimal(0) for e in kept), Decimal(0))


def create_adjustment(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/billing/meter_event_adjustments (``type=cancel``, within 24 hours)."""
    p = call.params
    identifier = p.get("cancel", {}).get("identifier")
    if identifier is None:
        raise missing_param("cancel[identifier]")
    event = store.events_by_identifier.get(identifier)
    if event is None or event.event_name != p["event_name"]:
        # UNVERIFIED: Stripe may accept the adjustment and fail it asynchronously instead.
        raise no_such("meter event", identifier, param="cancel[identifier]")
    if event.created <= call.now - IDENTIFIER_WINDOW:
        msg = "Meter events can only be cancelled within 24 hours of Stripe receiving them."
        raise invalid(msg, param="cancel[identifier]")
    event.cancelled = True
    return render_meter_event_adjustment(event.event_name, identifier)


def _windows(start: int, end: int, grouping: str | None) -> list[tuple[int, int]]:
    if grouping is None:
        return [(start, end)]
    width = _WINDOW_SECONDS[grouping]
    if (end - start) // width > MAX_WINDOWS:
        msg = f"Invalid value_grouping_window: at most {MAX_WINDOWS} windows can be summarised."
        raise invalid(msg, param="value_grouping_window")
    return [(s, min(s + width, end)) for s in range(start, end, width)]


def list_event_summaries(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/billing/meters/{id}/event_summaries (chronological; ordering UNVERIFIED)."""
    p = call.params
    meter = _get_meter(store, call.path_args["id"])
    customer = p["customer"]
    if customer not in store.customers:
        raise no_such("customer", customer, param="customer")
    start, end = p["start_time"], p["end_time"]
    grouping = p.get("value_grouping_window")
    # UNVERIFIED wording for the alignment refusals; the rules are in Stripe's API reference.
    for name, ts in (("start_time", start), ("end_time", end)):
        if not is_aligned(ts, "minute"):
            raise invalid(f"Invalid {name}: must be aligned with minute boundaries.", param=name)
        if grouping is not None and not is_aligned(ts, grouping):
            msg = (
                f"Invalid {name}: must be aligned with {grouping} boundaries (UTC) when "
                f"value_grouping_window={grouping}."
            )
            raise invalid(msg, param=name)
    if end <= start:
        raise invalid("Invalid end_time: must be after start_time.", param="end_time")
    mine = [e for e in store.events if e.meter == meter.id and e.customer == customer]
    summaries = [
        render_event_summary(
            meter.id, customer, s, e, aggregate(meter, (x for x in mine if s <= x.timestamp < e))
        )
        for s, e in _windows(start, end, grouping)
    ]
    return paginate(summaries, p, call.path, "billing meter event summary")
