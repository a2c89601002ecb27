"""``Reconciler``: reads Stripe's totals for a period and compares them with the ledger."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from dualwrite.config import Settings
from dualwrite.exceptions import ConfigError, StoreUnavailableError
from dualwrite.ledger import Ledger, LedgerRow
from dualwrite.models import StripeFailure
from dualwrite.periods import Period
from dualwrite.rate_limits import RateLimitedError, WriteLimits
from dualwrite.reconcile._matching import (
    BOUND_SLACK,
    assign_items,
    meter_window,
    summary_matches,
)
from dualwrite.reconcile._money import MoneyCheck
from dualwrite.reconcile._pricer import MoneyPricer
from dualwrite.reconcile._records import LegCheck, PeriodChoice, ReconciliationRecord, SkipReason
from dualwrite.reconcile._store import save_records
from dualwrite.stores import Stores
from dualwrite.stripe_io import (
    MeterInfo,
    ReadThrottle,
    StripeReader,
    StripeReadError,
    SubscriptionItemInfo,
    UsageSummary,
)

__all__ = ["READ_MAX_WAIT", "Progress", "Reconciler", "ReconciliationRun", "read_throttle"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Told ``(customers done, customers in all)`` after each customer."""

#: How long one read may wait for its turn under the shared read rate before it counts as failed.
READ_MAX_WAIT = 60.0


class ReconciliationRun(BaseModel):
    """The result of one ``dualwrite reconcile`` run."""

    model_config = ConfigDict(frozen=True)

    period: str
    checked_at: float
    settle_seconds: int
    customers: int
    records: list[ReconciliationRecord]

    @property
    def drifted(self) -> list[ReconciliationRecord]:
        """The records with drift on either leg."""
        return [record for record in self.records if record.drifted]

    def money_differs(self, tolerance: int = 0) -> list[ReconciliationRecord]:
        """The records whose legs would bill more than ``tolerance`` apart (or in different
        currencies), or whose preview Stripe billed otherwise than computed."""
        return [record for record in self.records if record.bills_differently(tolerance)]


def read_throttle(limits: WriteLimits, *, max_wait: float = READ_MAX_WAIT) -> ReadThrottle:
    """A throttle taking one unit of the shared ``reads`` rate per request."""

    async def take() -> None:
        try:
            await limits.take("reads", max_wait=max_wait)
        except StoreUnavailableError:
            log.warning("rate limits unavailable (Redis); reading Stripe without them")
        except RateLimitedError as exc:
            failure = StripeFailure(
                http_status=429,
                type="invalid_request_error",
                code="rate_limit",
                message=f"dualwrite held this read back: {exc}",
                retryable=True,
                retry_after=exc.retry_after,
            )
            raise StripeReadError(str(failure.message), failure=failure) from exc

    return take


def _named(meters: list[MeterInfo], event_name: str) -> list[MeterInfo]:
    """The meters with this event name, active ones first."""
    return sorted(
        (m for m in meters if m.event_name == event_name), key=lambda m: m.status != "active"
    )


def _whole(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


@dataclass(slots=True)
class _Customer:
    """What one customer's reconciliation read from Stripe, read once and shared by its rows."""

    name: str
    items: list[SubscriptionItemInfo] | StripeReadError | None = None
    summaries: dict[str, list[UsageSummary] | StripeReadError] = field(default_factory=dict)


class Reconciler:
    """Compares, per customer, meter event name and period, the ledger with Stripe's own totals.

    Args:
        ledger: where dualwrite's figures come from (and whose Redis keeps the records).
        reader: reads Stripe (within the shared read rate).
        settings: meters and items configuration (which item carries which event name).
        settle_seconds: compare only periods that ended at least this long ago (default: the
            ``[reconcile]`` setting).
        clock: now, in Unix seconds.
        concurrency: customers reconciled at once.
        money: also price each leg's total (``MoneyPricer``): Stripe's prices are read.
        preview: with ``money``, cross-check running periods with Stripe's invoice preview.
    """

    def __init__(
        self,
        ledger: Ledger,
        reader: StripeReader,
        settings: Settings,
        *,
        settle_seconds: int | None = None,
        clock: Callable[[], float] = time.time,
        concurrency: int = 8,
        money: bool = False,
        preview: bool = False,
    ):
        self.ledger = ledger
        self.reader = reader
        self.settings = settings
        self.settle_seconds = (
            settings.reconcile.settle_seconds if settle_seconds is None else settle_seconds
        )
        self._clock = clock
        self._concurrency = max(1, concurrency)
        self._meters: list[MeterInfo] | StripeReadError | None = None
        self._meters_lock = asyncio.Lock()
        self.pricer = MoneyPricer(reader, settings, preview=preview) if money else None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        stores: Stores,
        settle_seconds: int | None = None,
        clock: Callable[[], float] = time.time,
        money: bool = False,
        preview: bool = False,
    ) -> Reconciler:
        """A reconciler reading Stripe with ``STRIPE_API_KEY`` at ``[reconcile] reads_per_second``
        (``money``, ``preview``: as ``Reconciler`` takes them).

        Raises:
            ConfigError: no Stripe key is set.
        """
        api_key = settings.stripe_api_key_value()
        if not api_key:
            msg = "reconcile reads Stripe: set STRIPE_API_KEY"
            raise ConfigError(msg)
        limits = WriteLimits(
            stores.redis,
            stores.keys,
            settings.limits,
            reads_per_second=settings.reconcile.reads_per_second,
        )
        reader = StripeReader(settings.stripe, api_key=api_key, throttle=read_throttle(limits))
        return cls(
            stores.ledger,
            reader,
            settings,
            settle_seconds=settle_seconds,
            clock=clock,
            money=money,
            preview=preview,
        )

    async def aclose(self) -> None:
        """Close the Stripe reader."""
        await self.reader.aclose()

    async def run(
        self,
        period: str,
        *,
        customers: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> ReconciliationRun:
        """Reconcile every customer with ledger rows in ``period`` (or only ``customers``), store
        one record per customer, event name and period, and return them.

        ``period`` is a billing period id (exactly that period) or a date (every period holding
        that UTC day). A customer named in ``customers`` without ledger rows there is still checked
        against zero, for every configured meter, over ``period`` (for a date: that UTC day).

        Raises:
            ValueError: ``period`` is neither a period id nor a date.
            StoreUnavailableError: Redis could not be reached.
        """
        choice = PeriodChoice.parse(period)
        checked_at = self._clock()
        by_customer = await self._rows(choice, customers)
        total, done = len(by_customer), 0
        if progress is not None:
            progress(0, total)
        records: list[ReconciliationRecord] = []
        queue = iter(by_customer.items())
        failures: list[BaseException] = []

        async def worker() -> None:
            # A pool of workers over one queue, no cancellation: Stripe's refusals are recorded per
            # leg, so what stops a worker is Redis failing (or a bug); the others stop picking.
            nonlocal done
            for customer, rows in queue:
                if failures:
                    return
                try:
                    found = await self._customer(customer, rows, checked_at)
                    await save_records(self.ledger.redis, self.ledger.keys, found)
                except Exception as exc:
                    failures.append(exc)
                    return
                records.extend(found)
                done += 1
                if progress is not None:
                    progress(done, total)

        await asyncio.gather(*(worker() for _ in range(min(self._concurrency, total))))
        if failures:
            raise failures[0]
        records.sort(key=lambda r: (r.period, r.customer, r.event_name))
        return ReconciliationRun(
            period=choice.text,
            checked_at=checked_at,
            settle_seconds=self.settle_seconds,
            customers=total,
            records=records,
        )

    async def _rows(
        self, choice: PeriodChoice, customers: Sequence[str] | None
    ) -> dict[str, list[LedgerRow]]:
        since, until = choice.days
        by_customer: dict[str, list[LedgerRow]] = {}
        if customers is None:
            for row in await self.ledger.rows(since=since, until=until):
                if choice.matches(row.period):
                    by_customer.setdefault(row.customer, []).append(row)
            return dict(sorted(by_customer.items()))
        for customer in dict.fromkeys(customers):
            rows = [
                row
                for row in await self.ledger.rows(since=since, until=until, customer=customer)
                if choice.matches(row.period)
            ]
            by_customer[customer] = rows or [
                LedgerRow(
                    period=choice.text, customer=customer, event_name=meter.event_name, counters={}
                )
                for meter in self.settings.meters
            ]
        return by_customer

    async def _customer(
        self, customer: str, rows: list[LedgerRow], checked_at: float
    ) -> list[ReconciliationRecord]:
        state = _Customer(customer)
        records = []
        for row in sorted(rows, key=lambda r: (r.period, r.event_name)):
            legacy, items = await self._legacy(state, row, rows)
            meter, meter_id, window = await self._meter(row)
            money = None
            if self.pricer is not None:
                money = await self._money(self.pricer, state, row, rows, (legacy, meter))
            records.append(
                ReconciliationRecord(
                    customer=customer,
                    event_name=row.event_name,
                    period=row.period,
                    checked_at=checked_at,
                    intended_qty=row["quantity"],
                    legacy=legacy,
                    meter=meter,
                    items=items,
                    meter_id=meter_id,
                    window_start=window[0] if window else None,
                    window_end=window[1] if window else None,
                    money=money,
                )
            )
        return records

    async def _money(
        self,
        pricer: MoneyPricer,
        state: _Customer,
        row: LedgerRow,
        rows: list[LedgerRow],
        legs: tuple[LegCheck, LegCheck],
    ) -> MoneyCheck:
        """The record's money, from the legs just read."""
        try:
            items = (await self._items_of(state, rows)).get(row.event_name, [])
        except StripeReadError as exc:
            return MoneyCheck(skipped="stripe_error", detail=str(exc))
        meters = await self._meter_list()
        named = [] if isinstance(meters, StripeReadError) else _named(meters, row.event_name)
        formula = named[0].formula if named else None
        return await pricer.check(row, *legs, items=items, formula=formula)

    def _settled(self, span: Period) -> tuple[SkipReason, str] | None:
        now = self._clock()
        if span.end > now:
            return "open_period", "the period has not ended"
        if span.end + self.settle_seconds > now:
            wait = int(span.end + self.settle_seconds - now)
            return "not_settled", f"ended {int(now - span.end)} s ago; settles in {wait} s"
        return None

    # ------------------------------------------------------------------------------- legacy leg

    async def _legacy(
        self, state: _Customer, row: LedgerRow, rows: list[LedgerRow]
    ) -> tuple[LegCheck, list[str]]:
        ledger = {
            "expected_qty": row["legacy_expected_qty"],
            "accepted_qty": row["legacy_accepted_qty"],
        }
        span = row.span
        if span.kind == "day":
            detail = (
                "the ledger counts this period by UTC day; usage summaries are per billing period"
            )
            return LegCheck(**ledger, skipped="day_period", detail=detail), []
        unsettled = self._settled(span)
        if unsettled is not None:
            return LegCheck(**ledger, skipped=unsettled[0], detail=unsettled[1]), []
        try:
            items = await self._items_of(state, rows)
        except StripeReadError as exc:
            return LegCheck(**ledger, skipped="stripe_error", detail=str(exc)), []
        mine = items.get(row.event_name, [])
        if not mine:
            detail = (
                f"no subscription item of {state.name} is known to carry {row.event_name} "
                "(name it in [items], or its price in [[meters]] legacy_prices / lookup_keys)"
            )
            return LegCheck(**ledger, skipped="no_item", detail=detail), []
        names = [item.item for item in mine]
        odd = [item for item in mine if item.aggregate_usage not in (None, "sum")]
        unlike = (
            f"{odd[0].item} aggregates usage with {odd[0].aggregate_usage}, not sum" if odd else ""
        )
        if odd and self.pricer is None:
            return LegCheck(**ledger, skipped="not_comparable", detail=unlike), names
        oldest = min(other.span.start for other in rows if other.span.kind == "billing")
        total, used = 0, []
        for item in mine:
            try:
                summaries = await self._summaries(state, item.item, oldest)
            except StripeReadError as exc:
                return LegCheck(**ledger, skipped="stripe_error", detail=str(exc)), names
            for index, summary in enumerate(summaries):
                if summary_matches(summary, span):
                    if index == 0:
                        detail = f"Stripe still lists {summary.id} as {item.item}'s open period"
                        return LegCheck(**ledger, skipped="open_period", detail=detail), names
                    total += summary.total_usage
                    used.append(summary.id)
                    break
        if not used:
            detail = f"no usage record summary of {', '.join(names)} covers {row.period}"
            return LegCheck(**ledger, skipped="no_summary", detail=detail), names
        if odd:
            # Stripe's total is still what the price bills (money), but not the ledger's sum.
            detail = f"{unlike} ({' '.join(used)})"
            return LegCheck(
                **ledger, stripe_qty=total, skipped="not_comparable", detail=detail
            ), names
        drift = total - ledger["accepted_qty"]
        return LegCheck(**ledger, stripe_qty=total, drift=drift, detail=" ".join(used)), names

    async def _items_of(
        self, state: _Customer, rows: list[LedgerRow]
    ) -> dict[str, list[SubscriptionItemInfo]]:
        """Which of the customer's items carry each event name's legacy usage."""
        if state.items is None:
            try:
                state.items = await self.reader.customer_items(state.name)
            except StripeReadError as exc:
                state.items = exc
        if isinstance(state.items, StripeReadError):
            raise state.items
        meters = await self._meter_list()
        meter_names = (
            {} if isinstance(meters, StripeReadError) else {m.id: m.event_name for m in meters}
        )
        return assign_items(
            state.items, {row.event_name for row in rows}, self.settings, meter_names
        )

    async def _summaries(self, state: _Customer, item: str, oldest: int) -> list[UsageSummary]:
        """The item's summaries, newest first, back to the period starting at ``oldest`` (the
        customer's oldest period being reconciled); read once per customer and item."""
        known = state.summaries.get(item)
        if isinstance(known, StripeReadError):
            raise known
        if known is not None:
            return known
        found: list[UsageSummary] = []
        try:
            async for summary in self.reader.usage_summaries(item):
                found.append(summary)
                if summary.start is not None and summary.start <= oldest + BOUND_SLACK:
                    break
        except StripeReadError as exc:
            state.summaries[item] = exc
            raise
        state.summaries[item] = found
        return found

    # -------------------------------------------------------------------------------- meter leg

    async def _meter(self, row: LedgerRow) -> tuple[LegCheck, str | None, tuple[int, int]]:
        ledger = {
            "expected_qty": row["meter_expected_qty"],
            "accepted_qty": row["meter_accepted_qty"],
        }
        window = meter_window(row.span)
        unsettled = self._settled(row.span)
        if unsettled is not None:
            return LegCheck(**ledger, skipped=unsettled[0], detail=unsettled[1]), None, window
        meters = await self._meter_list()
        if isinstance(meters, StripeReadError):
            return LegCheck(**ledger, skipped="stripe_error", detail=str(meters)), None, window
        named = _named(meters, row.event_name)
        if not named:
            detail = f"Stripe has no meter for event name {row.event_name}"
            return LegCheck(**ledger, skipped="no_meter", detail=detail), None, window
        meter = named[0]
        how = f"window {meter.event_time_window}" if meter.event_time_window else meter.formula
        unlike = f"{meter.id} aggregates with {how}; the ledger sums quantities"
        if meter.event_time_window or (meter.formula != "sum" and self.pricer is None):
            return LegCheck(**ledger, skipped="not_comparable", detail=unlike), meter.id, window
        try:
            total = await self.reader.meter_total(
                meter.id, customer=row.customer, start=window[0], end=window[1]
            )
        except StripeReadError as exc:
            return LegCheck(**ledger, skipped="stripe_error", detail=str(exc)), meter.id, window
        stripe_qty = _whole(total)
        if meter.formula != "sum":
            # What the meter-backed price bills (money), but not the ledger's sum.
            check = LegCheck(
                **ledger, stripe_qty=stripe_qty, skipped="not_comparable", detail=unlike
            )
            return check, meter.id, window
        drift = _whole(total - ledger["accepted_qty"])
        return LegCheck(**ledger, stripe_qty=stripe_qty, drift=drift), meter.id, window

    async def _meter_list(self) -> list[MeterInfo] | StripeReadError:
        """The account's meters, read once per run (a refusal is kept, not retried)."""
        async with self._meters_lock:
            if self._meters is None:
                try:
                    self._meters = await self.reader.meters()
                except StripeReadError as exc:
                    self._meters = exc
            return self._meters
