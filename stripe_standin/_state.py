"""The stand-in's account: every object it holds, and the context each endpoint handler gets.

Objects are plain dataclasses; their wire shape lives in ``_objects.py`` only. One re-entrant lock
guards the whole account, because the server runs on its own thread while tests read totals from
theirs.
"""

from __future__ import annotations

import random
import re
import string
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from stripe_standin._calendar import Interval, subscription_period
from stripe_standin._clock import StandinClock
from stripe_standin._errors import invalid
from stripe_standin._pricing import PriceTier, Pricing

__all__ = [
    "BASIL",
    "Call",
    "Customer",
    "EventDestination",
    "Invoice",
    "InvoiceLine",
    "Meter",
    "MeterEvent",
    "MeterSession",
    "Price",
    "Product",
    "Store",
    "Subscription",
    "SubscriptionItem",
    "TestClock",
    "UsageRecord",
    "is_basil_or_later",
    "parse_version",
]

BASIL = "2025-03-31"
"""The API version date (``2025-03-31.basil``) that removed legacy usage-based billing."""

_VERSION = re.compile(r"^(\d{4}-\d{2}-\d{2})(\.[a-z]+)?$")
_ALPHABET = string.ascii_letters + string.digits


def parse_version(version: str) -> str:
    """The date part of a Stripe API version; refuses a malformed one as Stripe does."""
    match = _VERSION.match(version.strip())
    if match is None:
        raise invalid(f"Invalid Stripe API version: {version}", param="Stripe-Version")
    return match.group(1)


def is_basil_or_later(version: str) -> bool:
    """Whether ``version`` is ``2025-03-31.basil`` or newer (no legacy usage records there)."""
    return parse_version(version) >= BASIL


@dataclass(slots=True)
class Customer:
    """A customer."""

    id: str
    created: int
    name: str | None = None
    email: str | None = None
    description: str | None = None
    phone: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    test_clock: str | None = None
    """The test clock the customer lives on (its objects follow the clock's frozen time)."""


@dataclass(slots=True)
class TestClock:
    """A Stripe test clock: a frozen time that moves only when advanced (``_test_clocks``)."""

    id: str
    created: int
    deletes_after: int
    frozen_time: int
    name: str | None = None
    status: str = "ready"
    target: int | None = None
    """The frozen time an advance is moving to (while ``status`` is ``advancing``)."""
    ready_at: float = 0.0
    """When (``time.monotonic()``) the advance completes."""


@dataclass(slots=True)
class Product:
    """A product."""

    id: str
    created: int
    name: str
    active: bool = True
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Price:
    """A price; ``legacy_metered`` when metered without a meter (the usage-record kind)."""

    id: str
    created: int
    product: str
    currency: str
    unit_amount: int | None
    unit_amount_decimal: Decimal | None
    interval: Interval | None = None
    interval_count: int = 1
    usage_type: str = "licensed"
    aggregate_usage: str | None = None
    meter: str | None = None
    lookup_key: str | None = None
    nickname: str | None = None
    active: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
    billing_scheme: str = "per_unit"
    tiers_mode: str | None = None
    tiers: tuple[PriceTier, ...] = ()
    transform: tuple[int, str] | None = None
    """``transform_quantity``: ``(divide_by, round)``."""

    @property
    def pricing(self) -> Pricing:
        """What decides the amount the price bills (``_pricing``)."""
        unit = self.unit_amount_decimal
        if unit is None and self.unit_amount is not None:
            unit = Decimal(self.unit_amount)
        return Pricing(
            billing_scheme=self.billing_scheme,
            unit_amount=unit,
            tiers_mode=self.tiers_mode,
            tiers=self.tiers,
            divide_by=None if self.transform is None else self.transform[0],
            round=None if self.transform is None else self.transform[1],
        )

    @property
    def legacy_metered(self) -> bool:
        """Metered and backed by no meter: usage comes from usage records."""
        return self.usage_type == "metered" and self.meter is None


@dataclass(slots=True)
class Subscription:
    """A subscription; its periods follow its anchor and its prices' interval."""

    id: str
    created: int
    customer: str
    anchor: int
    interval: Interval
    interval_count: int
    currency: str
    items: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    schedule: str | None = None
    """The subscription schedule attached to it (``_schedules``), if any."""
    invoiced_until: int | None = None
    """The end of the last period invoiced (``_invoices``); None: none yet."""
    test_clock: str | None = None
    """Its customer's test clock: its periods follow that clock's frozen time."""

    def period(self, ts: int) -> tuple[int, int]:
        """The billing period ``[start, end)`` holding ``ts`` (``_calendar``)."""
        return subscription_period(
            created=self.created,
            anchor=self.anchor,
            interval=self.interval,
            interval_count=self.interval_count,
            ts=ts,
        )


@dataclass(slots=True)
class SubscriptionItem:
    """A subscription item; ``legacy_price`` remembers the last legacy price after a cutover."""

    id: str
    created: int
    subscription: str
    price: str
    quantity: int | None
    metadata: dict[str, str] = field(default_factory=dict)
    legacy_price: str | None = None
    history: list[tuple[int, str]] = field(default_factory=list)
    """``(from, price)``: each price the item held and since when (its subscription's time)."""

    def move_to(self, price: str, at: int) -> None:
        """Hold ``price`` from ``at`` on (a cutover: ``_catalog``, ``_schedules``)."""
        self.price = price
        self.history.append((at, price))

    def price_before(self, end: int) -> str:
        """The price the item held at the last moment before ``end``: the one that bills the
        period ending there (usage is billed in arrears, at the price the item has then)."""
        held = [price for since, price in self.history if since < end]
        return held[-1] if held else self.price


@dataclass(slots=True)
class InvoiceLine:
    """One line of an invoice: a subscription item's usage (or quantity) for a period, priced."""

    id: str
    subscription_item: str
    price: str
    quantity: int
    amount: int
    start: int
    end: int


@dataclass(slots=True)
class Invoice:
    """An invoice (``_invoices``): a subscription's period, closed at its end (a ``draft`` for an
    hour, then finalized), or a preview of the running period (never stored)."""

    id: str
    customer: str
    subscription: str
    currency: str
    period_start: int
    period_end: int
    created: int
    lines: list[InvoiceLine] = field(default_factory=list)
    finalized_at: int | None = None
    test_clock: str | None = None
    billing_reason: str = "subscription_cycle"

    @property
    def status(self) -> str:
        """``draft`` until finalized, then ``open`` (the stand-in takes no payments)."""
        return "draft" if self.finalized_at is None else "open"

    @property
    def subtotal(self) -> int:
        """The sum of the lines, in the currency's smallest unit."""
        return sum(line.amount for line in self.lines)


@dataclass(slots=True)
class UsageRecord:
    """One accepted legacy usage record."""

    id: str
    subscription_item: str
    quantity: int
    timestamp: int
    action: str
    created: int


@dataclass(slots=True)
class Meter:
    """A billing meter."""

    id: str
    created: int
    updated: int
    display_name: str
    event_name: str
    formula: str
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"
    event_time_window: str | None = None
    status: str = "active"
    deactivated_at: int | None = None


@dataclass(slots=True)
class MeterEvent:
    """An accepted meter event; ``counted`` is False when it failed Stripe's async validation."""

    identifier: str
    event_name: str
    payload: dict[str, str]
    timestamp: int
    created: int
    seq: int
    meter: str | None = None
    customer: str | None = None
    value: Decimal | None = None
    counted: bool = False
    cancelled: bool = False


@dataclass(slots=True)
class MeterSession:
    """An API v2 meter event session: its token authenticates the meter event stream."""

    id: str
    authentication_token: str
    created: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class EventDestination:
    """A webhook endpoint that receives thin events, signed with its ``secret``."""

    id: str
    url: str
    secret: str


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler needs about one request: the time, the API version, ids and parameters."""

    now: int
    version: str
    path: str
    path_args: Mapping[str, str]
    params: Mapping[str, Any]


@dataclass
class Store:
    """Every object in the stand-in's account; hold ``lock`` while reading or changing any of it."""

    clock: StandinClock
    seed: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    customers: dict[str, Customer] = field(default_factory=dict)
    products: dict[str, Product] = field(default_factory=dict)
    prices: dict[str, Price] = field(default_factory=dict)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    items: dict[str, SubscriptionItem] = field(default_factory=dict)
    usage: dict[str, list[UsageRecord]] = field(default_factory=dict)
    meters: dict[str, Meter] = field(default_factory=dict)
    events: list[MeterEvent] = field(default_factory=list)
    events_by_identifier: dict[str, MeterEvent] = field(default_factory=dict)
    async_errors: list[dict[str, Any]] = field(default_factory=list)
    reported_errors: int = 0
    meter_sessions: dict[str, MeterSession] = field(default_factory=dict)
    v2_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    destinations: list[EventDestination] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    schedules: dict[str, Any] = field(default_factory=dict)
    """Subscription schedules by id (``_schedules.Schedule``)."""
    invoices: dict[str, Any] = field(default_factory=dict)
    """Invoices by id, oldest first (``_invoices.Invoice``)."""
    test_clocks: dict[str, TestClock] = field(default_factory=dict)
    advance_seconds: float = 0.0
    """How long (real seconds) a test clock takes to advance."""

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def new_id(self, prefix: str, length: int = 14) -> str:
        """A fresh Stripe-style id (``cus_…``), deterministic for a given seed and call order."""
        with self.lock:
            suffix = "".join(self._rng.choice(_ALPHABET) for _ in range(length))
        return f"{prefix}_{suffix}"

    def session_state(self, token: str, now: int) -> str:
        """``"valid"``, ``"expired"`` or ``"unknown"`` for a meter event session token."""
        with self.lock:
            session = self.meter_sessions.get(token)
        if session is None:
            return "unknown"
        return "valid" if now < session.expires_at else "expired"

    def time_on(self, test_clock: str | None, now: int) -> int:
        """What "now" is for objects on ``test_clock``: its frozen time (``now`` off a clock)."""
        clock = self.test_clocks.get(test_clock) if test_clock is not None else None
        return now if clock is None else clock.frozen_time

    def time_of(self, sub: Subscription, now: int) -> int:
        """What "now" is for a subscription: its test clock's frozen time, else ``now``."""
        return self.time_on(sub.test_clock, now)

    def new_uuid(self) -> str:
        """A UUID-4-shaped identifier from the seeded generator (for generated meter identifiers)."""
        with self.lock:
            return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
