"""Legacy usage records: create, the per-period summaries, and the totals tests assert on.

Within one item, usage is kept per timestamp: ``increment`` adds to the quantity at its timestamp and
``set`` overwrites it. A period's ``total_usage`` then follows the price's ``aggregate_usage``:
``sum`` adds the period's quantities, ``max`` takes the largest, ``last_during_period`` the latest
in the period and ``last_ever`` the latest at or before the period's end, across periods.
"""

from __future__ import annotations

from typing import Any

from stripe_standin._calendar import usage_record_problem
from stripe_standin._errors import invalid, no_such
from stripe_standin._objects import (
    derived_id,
    paginate,
    render_usage_record,
    render_usage_summary,
)
from stripe_standin._state import Call, Store, SubscriptionItem, UsageRecord, is_basil_or_later

__all__ = ["create_usage_record", "item_total", "list_usage_summaries"]

MAX_SUMMARY_PERIODS = 10_000
"""How many periods back the summaries endpoint looks at most."""

NOT_LEGACY = (
    "Cannot create a usage record for `{item}` because it is not on the legacy metered billing "
    "system. Call /v1/billing/meter_events instead."
)
"""Stripe's refusal once an item moved to a meter-backed price (laravel/cashier-stripe#1709)."""

BEFORE_PERIOD = (
    "Cannot create the usage record with this timestamp because timestamps must be after the "
    "subscription's last invoice period (or current period start time)."
)
"""Stripe's refusal of a timestamp before the current period (authgear/authgear-server#2430)."""

# UNVERIFIED: Stripe documents that usage timestamps cannot be in the future, not the message.
IN_FUTURE = (
    "Cannot create the usage record with this timestamp because timestamps must not be in the "
    "future (the current time is {now})."
)

# UNVERIFIED: what Stripe answers when a basil-or-later version calls the removed endpoint.
REMOVED_IN_BASIL = (
    "Usage records were removed in API version 2025-03-31.basil (legacy usage-based billing). "
    "Send a pre-basil Stripe-Version such as 2025-02-24.acacia to keep using them until your "
    "migration to billing meters is complete."
)


def create_usage_record(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/subscription_items/{id}/usage_records."""
    if is_basil_or_later(call.version):
        raise invalid(REMOVED_IN_BASIL)
    item_id = call.path_args["id"]
    item = store.items.get(item_id)
    if item is None:
        raise no_such("subscription item", item_id, param="subscription_item")
    if not store.prices[item.price].legacy_metered:
        raise invalid(NOT_LEGACY.format(item=item_id))
    p = call.params
    sub = store.subscriptions[item.subscription]
    now = store.time_of(sub, call.now)  # on a test clock, "now" is its frozen time
    raw_ts = p.get("timestamp", "now")
    ts = now if raw_ts == "now" else int(raw_ts)
    start, _ = sub.period(now)
    problem = usage_record_problem(ts, now=now, period_start=start)
    if problem == "future":
        raise invalid(IN_FUTURE.format(now=now), param="timestamp")
    if problem == "before_period":
        raise invalid(BEFORE_PERIOD, param="timestamp")
    record = UsageRecord(
        id=store.new_id("mbur", 24),
        subscription_item=item_id,
        quantity=p["quantity"],
        timestamp=ts,
        action=p.get("action", "increment"),
        created=now,
    )
    store.usage.setdefault(item_id, []).append(record)
    return render_usage_record(record)


def _aggregate_usage(store: Store, item: SubscriptionItem) -> str:
    """The aggregation of the item's legacy price (its current one, or the one it left)."""
    price = store.prices[item.price]
    if not price.legacy_metered and item.legacy_price is not None:
        price = store.prices[item.legacy_price]
    return price.aggregate_usage or "sum"


def _quantities(records: list[UsageRecord]) -> dict[int, int]:
    """Usage per timestamp after replaying increments and sets in the order they arrived."""
    values: dict[int, int] = {}
    for record in records:
        if record.action == "set":
            values[record.timestamp] = record.quantity
        else:
            values[record.timestamp] = values.get(record.timestamp, 0) + record.quantity
    return values


def item_total(
    store: Store, item: SubscriptionItem, start: int, end: int, mode: str | None = None
) -> int:
    """``total_usage`` of ``item`` for the period ``[start, end)``, aggregated by ``mode`` (default:
    its legacy price's ``aggregate_usage``)."""
    values = _quantities(store.usage.get(item.id, []))
    mode = mode or _aggregate_usage(store, item)
    if mode == "last_ever":
        earlier = [ts for ts in values if ts < end]
        return values[max(earlier)] if earlier else 0
    in_period = {ts: q for ts, q in values.items() if start <= ts < end}
    if not in_period:
        return 0
    if mode == "max":
        return max(in_period.values())
    if mode == "last_during_period":
        return in_period[max(in_period)]
    return sum(in_period.values())


def list_usage_summaries(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/subscription_items/{id}/usage_record_summaries: newest period first."""
    item_id = call.path_args["id"]
    item = store.items.get(item_id)
    if item is None:
        raise no_such("subscription item", item_id, param="subscription_item")
    sub = store.subscriptions[item.subscription]
    now = store.time_of(sub, call.now)
    first_start, _ = sub.period(min(item.created, now))
    start, end = sub.period(now)
    summaries: list[dict[str, Any]] = []
    closed = False
    while len(summaries) < MAX_SUMMARY_PERIODS:
        total = item_total(store, item, start, end)
        invoice = derived_id("in", sub.id, start) if closed else None
        summaries.append(render_usage_summary(item_id, start, end, total, invoice=invoice))
        if start <= first_start:
            break
        closed = True
        start, end = sub.period(start - 1)
    return paginate(summaries, call.params, call.path, "usage record summary")
