"""``StripeStandin``: the local Stripe stand-in, its controls and the read-only views tests assert on."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from starlette.applications import Starlette

from stripe_standin._app import RequestLogEntry, Wakeup, build_app
from stripe_standin._clock import StandinClock
from stripe_standin._errors import StandinError, StripeApiError
from stripe_standin._faults import FaultInjector
from stripe_standin._idempotency import SavedReplies
from stripe_standin._invoices import refresh, settle_invoices
from stripe_standin._meters import aggregate, find_meter
from stripe_standin._notifications import (
    DELIVERY_TIMEOUT,
    add_destination,
    build_reports,
    deliver,
    refuse_accepted,
)
from stripe_standin._objects import render_invoice
from stripe_standin._schedules import apply_due_phases
from stripe_standin._state import Store, SubscriptionItem, parse_version
from stripe_standin._streams import expire_sessions
from stripe_standin._test_clocks import settle_test_clocks
from stripe_standin._usage import item_total
from stripe_standin.checking import SpecChecker

__all__ = ["StripeStandin"]

MAX_LOGGED_REQUESTS = 10_000
_TEST_KEY_PREFIXES = ("sk_test_", "rk_test_")


class StripeStandin:
    """A local Stripe speaking Stripe's wire format: customers, prices, subscriptions, legacy usage
    records and Billing Meters (v1 meter events and API v2's session-authenticated meter event
    stream), with a movable clock, injectable faults, Stripe's idempotency, and the thin events
    Stripe sends to event destinations when it refuses meter events late.

    ``api_keys=None`` accepts any key starting with ``sk_test_`` or ``rk_test_``; otherwise only the
    keys given. Requests without a ``Stripe-Version`` header use ``default_api_version``.
    ``spec_checker`` checks each call against Stripe's published spec (``checking``).
    ``test_clock_advance_seconds``: how long a Stripe test clock takes to advance.
    """

    def __init__(
        self,
        *,
        api_keys: Iterable[str] | None = None,
        start_time: int | None = None,
        default_api_version: str = "2025-02-24.acacia",
        latency_seconds: float = 0.0,
        seed: int = 0,
        spec_checker: SpecChecker | None = None,
        test_clock_advance_seconds: float = 0.0,
    ) -> None:
        try:
            parse_version(default_api_version)
        except StripeApiError as exc:
            msg = f"default_api_version {default_api_version!r} is not a Stripe API version"
            raise StandinError(msg) from exc
        if isinstance(api_keys, str):
            msg = "api_keys takes a collection of keys, not a single string"
            raise StandinError(msg)
        self._api_keys = None if api_keys is None else frozenset(api_keys)
        self.default_api_version = default_api_version
        self.latency_seconds = latency_seconds
        self.clock = StandinClock(start_time)
        self.faults = FaultInjector(seed=seed)
        self._store = Store(clock=self.clock, seed=seed)
        self.test_clock_advance_seconds = test_clock_advance_seconds
        self._idempotency = SavedReplies()
        self._wakeup = Wakeup()
        self._log: deque[RequestLogEntry] = deque(maxlen=MAX_LOGGED_REQUESTS)
        self._log_lock = threading.Lock()
        self.spec_checker = spec_checker
        """Checks every call against Stripe's spec (None: the one ``checking.install`` set)."""
        self.app: Starlette = build_app(self)

    @property
    def latency_seconds(self) -> float:
        """How long every ``/v1`` and ``/v2`` reply is delayed (for benchmarks); settable."""
        return self._latency

    @latency_seconds.setter
    def latency_seconds(self, value: float) -> None:
        """Set the delay (seconds, not negative)."""
        if value < 0:
            msg = f"latency_seconds must not be negative, got {value!r}"
            raise StandinError(msg)
        self._latency = float(value)

    @property
    def test_clock_advance_seconds(self) -> float:
        """How long (real seconds) a test clock stays ``advancing`` after an advance; settable
        (0: it is ``ready`` at the next call)."""
        return self._store.advance_seconds

    @test_clock_advance_seconds.setter
    def test_clock_advance_seconds(self, value: float) -> None:
        """Set the delay (seconds, not negative)."""
        if value < 0:
            msg = f"test_clock_advance_seconds must not be negative, got {value!r}"
            raise StandinError(msg)
        self._store.advance_seconds = float(value)

    def accepts_key(self, key: str) -> bool:
        """Whether ``key`` is a valid API key for this stand-in."""
        if self._api_keys is None:
            return key.startswith(_TEST_KEY_PREFIXES) and len(key) > len("sk_test_")
        return key in self._api_keys

    def _record(self, entry: RequestLogEntry) -> None:
        """Append one call to the bounded request log."""
        with self._log_lock:
            self._log.append(entry)

    @property
    def requests(self) -> list[RequestLogEntry]:
        """The last 10,000 calls, oldest first."""
        with self._log_lock:
            return list(self._log)

    def reset_requests(self) -> None:
        """Empty the request log."""
        with self._log_lock:
            self._log.clear()

    def _item(self, subscription_item: str) -> SubscriptionItem:
        item = self._store.items.get(subscription_item)
        if item is None:
            msg = f"the stand-in has no subscription item {subscription_item!r}"
            raise StandinError(msg)
        return item

    def legacy_total(self, subscription_item: str, period_start: int | None = None) -> int:
        """``total_usage`` of the item's period holding ``period_start`` (default: the current one,
        on its test clock's time if it has one)."""
        with self._store.lock:
            settle_test_clocks(self._store)
            item = self._item(subscription_item)
            sub = self._store.subscriptions[item.subscription]
            at = (
                self._store.time_of(sub, self.clock.now()) if period_start is None else period_start
            )
            start, end = sub.period(at)
            return item_total(self._store, item, start, end)

    def meter_total(
        self, customer: str, event_name: str, start: int | None = None, end: int | None = None
    ) -> float:
        """The meter's aggregate for ``customer`` over counted, non-cancelled events in ``[start, end)``."""
        with self._store.lock:
            meter = find_meter(self._store, event_name)
            if meter is None:
                return 0.0
            events = (
                e
                for e in self._store.events
                if e.meter == meter.id
                and e.customer == customer
                and (start is None or e.timestamp >= start)
                and (end is None or e.timestamp < end)
            )
            return aggregate(meter, events)

    def meter_events(
        self, customer: str | None = None, event_name: str | None = None
    ) -> list[dict[str, Any]]:
        """Every accepted meter event (counted or not), oldest first, as plain dicts."""
        with self._store.lock:
            return [
                {
                    "identifier": e.identifier,
                    "event_name": e.event_name,
                    "payload": dict(e.payload),
                    "timestamp": e.timestamp,
                    "created": e.created,
                    "customer": e.customer,
                    "meter": e.meter,
                    "value": None if e.value is None else float(e.value),
                    "counted": e.counted,
                    "cancelled": e.cancelled,
                }
                for e in self._store.events
                if customer in (None, e.customer) and event_name in (None, e.event_name)
            ]

    def usage_records(self, subscription_item: str | None = None) -> list[dict[str, Any]]:
        """Every accepted legacy usage record, oldest first, as plain dicts."""
        with self._store.lock:
            return [
                {
                    "id": r.id,
                    "subscription_item": r.subscription_item,
                    "quantity": r.quantity,
                    "timestamp": r.timestamp,
                    "action": r.action,
                    "created": r.created,
                }
                for item_id, records in self._store.usage.items()
                if subscription_item in (None, item_id)
                for r in records
            ]

    def invoices(
        self, *, customer: str | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        """Every invoice so far (periods that ended on their subscription's time), oldest first,
        as ``GET /v1/invoices`` renders them for ``version`` (default: ``default_api_version``)."""
        with self._store.lock:
            settle_test_clocks(self._store)
            apply_due_phases(self._store, self.clock.now())
            settle_invoices(self._store, self.clock.now())
            return [
                render_invoice(
                    refresh(self._store, invoice), self._store, version or self.default_api_version
                )
                for invoice in self._store.invoices.values()
                if customer in (None, invoice.customer)
            ]

    @property
    def async_errors(self) -> list[dict[str, Any]]:
        """Meter events accepted but refused by Stripe's asynchronous checks, oldest first, each
        with ``code``, ``identifier``, ``event_name``, ``meter``, ``message`` and ``created``."""
        with self._store.lock:
            return [dict(error) for error in self._store.async_errors]

    def expire_meter_sessions(self) -> int:
        """End every meter event session now (to test renewal mid-stream); return how many."""
        return expire_sessions(self._store, self.clock.now())

    def add_event_destination(self, url: str, secret: str) -> str:
        """Send the thin events of later error reports to ``url``, signed with ``secret``
        (a ``whsec_…`` string); return the destination's id."""
        return add_destination(self._store, url, secret).id

    @property
    def event_destinations(self) -> list[dict[str, str]]:
        """The registered destinations: ``id``, ``url`` and ``secret``."""
        with self._store.lock:
            return [
                {"id": d.id, "url": d.url, "secret": d.secret} for d in self._store.destinations
            ]

    @property
    def event_deliveries(self) -> list[dict[str, Any]]:
        """Every delivery attempt, oldest first: ``event``, ``type``, ``destination``, ``url``,
        ``status`` (None when no reply came) and ``error``."""
        with self._store.lock:
            return [dict(delivery) for delivery in self._store.deliveries]

    def refuse_later(
        self,
        identifier: str,
        *,
        code: str = "meter_event_customer_not_found",
        message: str | None = None,
    ) -> dict[str, Any]:
        """Refuse an accepted, counted meter event after the fact: it stops counting and its
        error (returned) goes into the next ``report_meter_errors``."""
        return refuse_accepted(self._store, identifier, code, message, self.clock.now())

    def report_meter_errors(self, *, timeout: float = DELIVERY_TIMEOUT) -> list[dict[str, Any]]:
        """Report the async errors collected since the last report, as Stripe does: one
        ``v1.billing.meter.error_report_triggered`` event per meter (``…no_meter_found`` for
        events naming no meter), retrievable at ``GET /v2/core/events/{id}``, each thin payload
        POSTed, signed, to every event destination. Returns the full events, oldest first.

        Blocks until every destination answered (or ``timeout`` passed): from async code whose
        event loop serves a destination, call it through ``anyio.to_thread.run_sync``.
        """
        events = build_reports(self._store, self.clock.now())
        deliver(self._store, events, timeout=timeout)
        return events

    def state(self) -> dict[str, Any]:
        """A JSON summary: clock, counts, meter totals per customer and legacy totals per item."""
        with self._store.lock:
            st = self._store
            meter_totals: dict[str, dict[str, float]] = {}
            for customer in sorted({e.customer for e in st.events if e.counted and e.customer}):
                for name in sorted({m.event_name for m in st.meters.values()}):
                    meter_totals.setdefault(customer, {})[name] = self.meter_total(customer, name)
            legacy_totals = {
                item.id: self.legacy_total(item.id)
                for item in st.items.values()
                if st.prices[item.price].legacy_metered or item.legacy_price is not None
            }
            counts = {
                "customers": len(st.customers),
                "products": len(st.products),
                "prices": len(st.prices),
                "subscriptions": len(st.subscriptions),
                "subscription_items": len(st.items),
                "usage_records": sum(len(r) for r in st.usage.values()),
                "meters": len(st.meters),
                "meter_events": len(st.events),
                "async_errors": len(st.async_errors),
                "unreported_async_errors": len(st.async_errors) - st.reported_errors,
                "meter_sessions": len(st.meter_sessions),
                "v2_events": len(st.v2_events),
                "event_destinations": len(st.destinations),
                "test_clocks": len(st.test_clocks),
                "requests": len(self._log),
            }
        return {
            "clock": self.clock.now(),
            "default_api_version": self.default_api_version,
            "counts": counts,
            "meter_totals": meter_totals,
            "legacy_totals": legacy_totals,
            "faults": self.faults.describe(),
        }
