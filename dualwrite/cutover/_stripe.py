"""The cutover's Stripe calls, through the official SDK: a customer's billing period, and the
subscription schedule that moves its item to the meter-backed price at the period end.

Stripe's migration guide (docs.stripe.com/billing/subscriptions/usage-based-legacy/migration-guide)
switches each subscription to the new price with a subscription schedule at the end of the billing
cycle. Here that is two calls: ``POST /v1/subscription_schedules`` with ``from_subscription`` (the
schedule starts with one phase: the subscription as it is, until its period end), then
``POST /v1/subscription_schedules/{id}`` with two phases: the current one ending at the period end,
and the next one, one billing period long, with the legacy item's price replaced by the
meter-backed one; ``end_behavior=release`` leaves the subscription on the new price afterwards.
Both calls carry idempotency keys derived from the customer, subscription and instant, and are sent
at the pinned pre-basil version (the current phase still holds the legacy metered price, which
basil refuses to attach). ``plan_schedule`` builds the very calls ``--dry-run`` prints.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

from dualwrite.cutover._cohorts import CutoverInputError
from dualwrite.cutover._models import StripeCall
from dualwrite.exceptions import CutoverStripeError
from dualwrite.periods import INTERVALS, Interval, add_interval, period_containing
from dualwrite.stripe_io import AccountStripe

__all__ = [
    "CUTOVER_METADATA",
    "SCHEDULE_PLACEHOLDER",
    "CutoverStripe",
    "CutoverStripeError",
    "PriceInfo",
    "SubscriptionItemPrice",
    "SubscriptionPeriod",
    "check_schedulable",
    "plan_release",
    "plan_schedule",
]

#: The metadata key a cutover's schedule carries: ``<customer>:<instant>``.
CUTOVER_METADATA = "dualwrite_cutover"
#: How a dry run names the schedule the first call would create.
SCHEDULE_PLACEHOLDER = "{schedule created by the previous call}"
_SCHEDULES = "/v1/subscription_schedules"


@dataclass(frozen=True, slots=True)
class SubscriptionItemPrice:
    """One item of a subscription and its price."""

    item: str
    price: str
    legacy_metered: bool
    metered: bool
    quantity: int | None


@dataclass(frozen=True, slots=True)
class SubscriptionPeriod:
    """A customer's subscription and its current billing period, as Stripe reports them."""

    customer: str
    subscription: str
    current_period_start: int
    current_period_end: int
    interval: Interval
    interval_count: int
    schedule: str | None
    items: tuple[SubscriptionItemPrice, ...]
    billing_cycle_anchor: int | None = None
    """Every billing period follows from it (a subscription anchored on the 31st bills on Feb 28,
    then on Mar 31)."""
    test_clock: str | None = None
    """The Stripe test clock the subscription lives on: its period end is in the clock's time."""

    @property
    def legacy_items(self) -> list[SubscriptionItemPrice]:
        """The items on a legacy metered price (usage records)."""
        return [item for item in self.items if item.legacy_metered]


@dataclass(frozen=True, slots=True)
class PriceInfo:
    """What a cutover checks about the meter-backed price."""

    id: str
    meter: str | None
    usage_type: str | None
    interval: str | None
    interval_count: int
    product: str | None


def _key(kind: str, *parts: object) -> str:
    digest = hashlib.sha256("|".join(str(part) for part in parts).encode()).hexdigest()[:32]
    return f"dw-cutover-{kind}-{digest}"


def plan_schedule(
    period: SubscriptionPeriod,
    *,
    price: str,
    at: int,
    stripe_version: str,
    schedule: str | None = None,
    phase_start: int | None = None,
) -> list[StripeCall]:
    """The two calls that move ``period``'s legacy item(s) to ``price`` at ``at``.

    ``schedule`` is the created schedule's id (None in a dry run); ``phase_start`` its first
    phase's start as Stripe returned it (default: the current period's start).
    """
    current = [_phase_item(item, item.price) for item in period.items]
    moved = [
        _phase_item(item, price if item.legacy_metered else item.price) for item in period.items
    ]
    if period.billing_cycle_anchor is None:
        next_end = add_interval(at, period.interval, period.interval_count)
    else:  # from the anchor, as Stripe bills: never by adding an interval to a clamped day
        _, next_end = period_containing(
            period.billing_cycle_anchor, period.interval, period.interval_count, at
        )
    create = StripeCall(
        method="POST",
        path=_SCHEDULES,
        params={"from_subscription": period.subscription},
        stripe_version=stripe_version,
        idempotency_key=_key("create", period.customer, period.subscription, at),
    )
    update = StripeCall(
        method="POST",
        path=f"{_SCHEDULES}/{schedule or SCHEDULE_PLACEHOLDER}",
        params={
            "end_behavior": "release",
            "proration_behavior": "none",
            "phases": [
                {
                    "start_date": phase_start or period.current_period_start,
                    "end_date": at,
                    "items": current,
                },
                {"start_date": at, "end_date": next_end, "items": moved},
            ],
            "metadata": {CUTOVER_METADATA: f"{period.customer}:{at}"},
        },
        stripe_version=stripe_version,
        idempotency_key=_key("phases", period.customer, period.subscription, at, price),
    )
    return [create, update]


def plan_release(customer: str, schedule: str, *, stripe_version: str) -> StripeCall:
    """The call releasing ``schedule`` (the subscription stays as it is now, its later phases
    dropped): what a rollback makes when a cutover's price move has not happened yet."""
    return StripeCall(
        method="POST",
        path=f"{_SCHEDULES}/{schedule}/release",
        stripe_version=stripe_version,
        idempotency_key=_key("release", customer, schedule),
    )


def _phase_item(item: SubscriptionItemPrice, price: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"price": price}
    if not item.metered and price == item.price and item.quantity is not None:
        entry["quantity"] = item.quantity
    return entry


class CutoverStripe(AccountStripe):
    """Stripe reads and writes of a cutover, with the account's key, at ``legacy_api_version``.

    Args:
        settings: where Stripe is; ``legacy_api_version`` is sent on every call.
        api_key: the account's secret key (never logged or returned).
    """

    error = CutoverStripeError

    async def subscription_period(self, customer: str) -> SubscriptionPeriod:
        """The customer's active subscription and its current period.

        Raises:
            CutoverStripeError: Stripe refused the read, the customer has no active
                subscription, or several with different period ends.
        """
        periods = await self.subscriptions(customer)
        if not periods:
            msg = (
                f"{customer} has no active subscription in Stripe, so it has no period end; "
                "give --at now or an ISO time instead"
            )
            raise CutoverStripeError(msg)
        ends = {period.current_period_end for period in periods}
        if len(ends) > 1:
            listed = ", ".join(f"{p.subscription} ends {p.current_period_end}" for p in periods)
            msg = (
                f"{customer} has subscriptions ending at different times ({listed}); "
                "give --at with the instant you want"
            )
            raise CutoverStripeError(msg)
        with_legacy = [period for period in periods if period.legacy_items]
        return (with_legacy or periods)[0]

    async def subscriptions(self, customer: str) -> list[SubscriptionPeriod]:
        """The customer's active subscriptions (none: an empty list).

        Raises:
            CutoverStripeError: Stripe refused the read, or a subscription shows no period.
        """
        subs = self.list_all("/v1/subscriptions", customer=customer, status="active")
        return [_period(customer, sub) async for sub in subs]

    async def schedule(self, schedule: str) -> dict[str, Any]:
        """A subscription schedule as Stripe returns it.

        Raises:
            CutoverStripeError: Stripe refused the read.
        """
        return await self.request("GET", f"{_SCHEDULES}/{schedule}")

    async def release_schedule(self, call: StripeCall) -> StripeCall:
        """Make a release planned by ``plan_release``; returns it with the schedule's id.

        Raises:
            CutoverStripeError: Stripe refused the call.
        """
        released = await self.request("POST", call.path, idempotency_key=call.idempotency_key)
        return call.model_copy(update={"result_id": str(released.get("id", ""))})

    async def price(self, price: str) -> PriceInfo:
        """A price's meter, usage type and interval.

        Raises:
            CutoverStripeError: Stripe refused the read (an unknown price, for one).
        """
        data = await self.request("GET", f"/v1/prices/{price}")
        recurring = dict(data.get("recurring") or {})
        return PriceInfo(
            id=str(data.get("id", price)),
            meter=str(recurring["meter"]) if recurring.get("meter") else None,
            usage_type=str(recurring["usage_type"]) if recurring.get("usage_type") else None,
            interval=str(recurring["interval"]) if recurring.get("interval") else None,
            interval_count=int(recurring.get("interval_count") or 1),
            product=str(data["product"]) if data.get("product") else None,
        )

    async def schedule_price_move(
        self, period: SubscriptionPeriod, *, price: str, at: int
    ) -> list[StripeCall]:
        """Create the schedule and set its phases; returns the calls made, with result ids.

        Raises:
            CutoverStripeError: Stripe refused a call; when the second one fails the message
                names the schedule the first one created.
        """
        create, _ = plan_schedule(period, price=price, at=at, stripe_version=self.stripe_version)
        created = await self.request(
            "POST", create.path, idempotency_key=create.idempotency_key, **create.params
        )
        schedule = str(created.get("id", ""))
        phases = list(created.get("phases") or [])
        phase_start = int(phases[0]["start_date"]) if phases else None
        _, update = plan_schedule(
            period,
            price=price,
            at=at,
            stripe_version=self.stripe_version,
            schedule=schedule,
            phase_start=phase_start,
        )
        try:
            updated = await self.request(
                "POST", update.path, idempotency_key=update.idempotency_key, **update.params
            )
        except CutoverStripeError as exc:
            msg = f"{exc} (schedule {schedule} was created; release it or retry the cutover)"
            raise CutoverStripeError(msg, failure=exc.failure) from exc
        return [
            create.model_copy(update={"result_id": schedule}),
            update.model_copy(update={"result_id": str(updated.get("id", schedule))}),
        ]


def _period(customer: str, sub: dict[str, Any]) -> SubscriptionPeriod:
    listed = dict(sub.get("items") or {})
    entries = [dict(entry) for entry in listed.get("data") or []]
    items: list[SubscriptionItemPrice] = []
    interval: str = "month"
    interval_count = 1
    for entry in entries:
        price = dict(entry.get("price") or {})
        recurring = dict(price.get("recurring") or {})
        metered = recurring.get("usage_type") == "metered"
        items.append(
            SubscriptionItemPrice(
                item=str(entry["id"]),
                price=str(price.get("id", "")),
                legacy_metered=metered and not recurring.get("meter"),
                metered=metered,
                quantity=int(entry["quantity"]) if entry.get("quantity") is not None else None,
            )
        )
        interval = str(recurring.get("interval") or interval)
        interval_count = int(recurring.get("interval_count") or interval_count)
    first = entries[0] if entries else {}
    start = sub.get("current_period_start", first.get("current_period_start"))
    end = sub.get("current_period_end", first.get("current_period_end"))
    anchor = sub.get("billing_cycle_anchor")
    if start is None or end is None or interval not in INTERVALS:
        msg = f"subscription {sub.get('id')} of {customer} shows no current period in Stripe"
        raise CutoverStripeError(msg)
    return SubscriptionPeriod(
        customer=customer,
        subscription=str(sub["id"]),
        current_period_start=int(start),
        current_period_end=int(end),
        interval=cast(Interval, interval),
        interval_count=interval_count,
        schedule=str(sub["schedule"]) if sub.get("schedule") else None,
        items=tuple(items),
        billing_cycle_anchor=anchor if isinstance(anchor, int) else None,
        test_clock=str(sub["test_clock"]) if sub.get("test_clock") else None,
    )


async def check_schedulable(stripe: CutoverStripe, period: SubscriptionPeriod, price: str) -> None:
    """Refuse a schedule Stripe would refuse or that would move the wrong thing: a subscription
    that has one already, no legacy item, or a price that is not meter-backed with its interval."""
    if period.schedule is not None:
        msg = (
            f"subscription {period.subscription} already has schedule {period.schedule}; "
            "add the price change to it, or release it, then cut over without --with-schedule"
        )
        raise CutoverInputError(msg)
    if not period.legacy_items:
        msg = f"subscription {period.subscription} has no legacy metered item to move"
        raise CutoverInputError(msg)
    info = await stripe.price(price)
    if info.meter is None or info.usage_type != "metered":
        msg = f"--price {price} is not a meter-backed metered price (recurring[meter] is unset)"
        raise CutoverInputError(msg)
    if (info.interval, info.interval_count) != (period.interval, period.interval_count):
        msg = (
            f"--price {price} bills every {info.interval_count} {info.interval}, the "
            f"subscription every {period.interval_count} {period.interval}; use a price with "
            "the subscription's interval"
        )
        raise CutoverInputError(msg)
