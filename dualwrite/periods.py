"""Ledger periods: a customer's billing period where Stripe has one, else the UTC day.

Totals are compared per period because that is how Stripe bills (and how its legacy usage summaries
are cut). An event on a subscription item belongs to the item's billing period, read from Stripe once
per item and period and cached in Redis (and in memory); periods other than the current one follow
from the subscription's billing cycle anchor, as Stripe computes them. An event without an item, or
of a customer whose periods could never be read, belongs to its UTC day.

Period ids: ``2026-11-25`` for a UTC day, ``20261101T000000Z/20261201T000000Z`` for a billing period
(start included, end excluded).
"""

from __future__ import annotations

import calendar
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from dualwrite.exceptions import StoreUnavailableError
from dualwrite.keys import KeySpace
from dualwrite.models import UsageEvent, utc_day
from dualwrite.redis_client import as_str, store_errors

__all__ = [
    "ANCHOR_KEEP_SECONDS",
    "INTERVALS",
    "LOCAL_PERIODS_MAX",
    "Interval",
    "ItemLookup",
    "ItemPeriods",
    "Period",
    "PeriodResolver",
    "add_interval",
    "period_containing",
    "period_of",
]

log = logging.getLogger(__name__)

Interval = Literal["day", "week", "month", "year"]
"""A recurring price's billing interval."""
INTERVALS = ("day", "week", "month", "year")
#: Items whose current period a process keeps in memory (beyond it, they are re-read from Redis).
LOCAL_PERIODS_MAX = 100_000
#: How long an item's billing cycle is kept past its current period's end, so that the next
#: period follows from the anchor when Stripe cannot be read at the rollover.
ANCHOR_KEEP_SECONDS = 35 * 86_400

_SECONDS = {"day": 86_400, "week": 7 * 86_400}
_STAMP = "%Y%m%dT%H%M%SZ"


def add_interval(anchor: int, interval: Interval, count: int) -> int:
    """``anchor`` plus ``count`` intervals (negative counts go back), calendar-aware for months."""
    if interval in _SECONDS:
        return anchor + count * _SECONDS[interval]
    months = count * (12 if interval == "year" else 1)
    start = datetime.fromtimestamp(anchor, tz=UTC)
    month_index = start.year * 12 + (start.month - 1) + months
    year, month = divmod(month_index, 12)
    day = min(start.day, calendar.monthrange(year, month + 1)[1])
    return int(start.replace(year=year, month=month + 1, day=day).timestamp())


def period_containing(anchor: int, interval: Interval, count: int, ts: int) -> tuple[int, int]:
    """The billing period ``[start, end)`` that holds ``ts`` for a subscription anchored at ``anchor``."""
    if interval in _SECONDS:
        length = _SECONDS[interval] * count
        k = (ts - anchor) // length
        return anchor + k * length, anchor + (k + 1) * length
    unit = 12 if interval == "year" else 1
    first = datetime.fromtimestamp(anchor, tz=UTC)
    at = datetime.fromtimestamp(ts, tz=UTC)
    months = (at.year - first.year) * 12 + (at.month - first.month)
    k = months // (unit * count)
    # The estimate can be one period off around the anchor's day and time of day: correct it.
    while add_interval(anchor, interval, k * count) > ts:
        k -= 1
    while add_interval(anchor, interval, (k + 1) * count) <= ts:
        k += 1
    return add_interval(anchor, interval, k * count), add_interval(
        anchor, interval, (k + 1) * count
    )


class Period(BaseModel):
    """A ledger period: ``[start, end)`` in Unix seconds."""

    model_config = ConfigDict(frozen=True)

    start: int
    end: int
    kind: Literal["billing", "day"]

    @property
    def id(self) -> str:
        """The period's id in ledger keys and reports."""
        if self.kind == "day":
            return utc_day(self.start)
        return f"{_stamp(self.start)}/{_stamp(self.end)}"

    @classmethod
    def day_of(cls, timestamp: int) -> Period:
        """The UTC day holding ``timestamp``."""
        start = timestamp - timestamp % 86_400
        return cls(start=start, end=start + 86_400, kind="day")

    @classmethod
    def parse(cls, period_id: str) -> Period:
        """The period named by an id (``ValueError`` if it names none)."""
        if "/" in period_id:
            first, _, last = period_id.partition("/")
            return cls(start=_unstamp(first), end=_unstamp(last), kind="billing")
        day = datetime.strptime(period_id, "%Y-%m-%d").replace(tzinfo=UTC)
        return cls.day_of(int(day.timestamp()))

    def closed(self, now: float) -> bool:
        """Whether the period is over."""
        return self.end <= now


@functools.lru_cache(maxsize=8192)
def period_of(period_id: str) -> Period:
    """``Period.parse``, remembered: reports parse the same few period ids again and again."""
    return Period.parse(period_id)


@functools.lru_cache(maxsize=4096)  # every event of a period formats the same two bounds
def _stamp(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime(_STAMP)


def _unstamp(text: str) -> int:
    return calendar.timegm(time.strptime(text, _STAMP))


class ItemPeriods(BaseModel):
    """What is cached per subscription item: its current period, its interval, its subscription's
    billing cycle anchor and its customer."""

    model_config = ConfigDict(frozen=True)

    start: int
    end: int
    interval: Interval
    interval_count: int = 1
    anchor: int | None = None
    """The subscription's ``billing_cycle_anchor``: every other period follows from it (None in
    entries cached before it was kept: the current period's start stands in)."""
    customer: str | None = None
    """The customer the item's subscription belongs to."""

    def containing(self, timestamp: int) -> Period:
        """The billing period holding ``timestamp`` (earlier and later periods included).

        The current period is Stripe's own (a first, partial period included); the others are
        computed from the anchor as Stripe computes them, never from a neighbouring period: a
        subscription anchored on the 31st bills on Feb 28 and then on Mar 31 again.
        """
        if self.start <= timestamp < self.end:
            return Period(start=self.start, end=self.end, kind="billing")
        anchor = self.start if self.anchor is None else self.anchor
        start, end = period_containing(anchor, self.interval, self.interval_count, timestamp)
        return Period(start=start, end=end, kind="billing")


ItemLookup = Callable[[str, str | None], Awaitable["ItemPeriods | None"]]
"""Reads an item's current billing period and interval from Stripe, with the given API key (None:
the configured one); None when it cannot."""


class PeriodResolver:
    """Finds an event's ledger period.

    An item's entry is kept ``ANCHOR_KEEP_SECONDS`` past its period's end: when the read at a
    rollover fails (a 500, a 429 when many customers share an anchor), the next period still
    follows from the known anchor, and an item never read before falls back to the periods of its
    customer's other items. Only usage of a customer whose periods were never read counts in its
    UTC day.

    Args:
        redis: the shared cache.
        keys: where the cache lives.
        lookup: reads an item's current period and interval from Stripe (``None`` when it cannot).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        lookup: ItemLookup,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self._redis = redis
        self._keys = keys
        self._lookup = lookup
        self._clock = clock
        self._local: dict[str, ItemPeriods] = {}

    async def period_for(self, event: UsageEvent, *, api_key: str | None = None) -> Period:
        """The billing period of the event's item, else its UTC day; never raises."""
        item = event.subscription_item
        if item is None:
            return Period.day_of(event.timestamp)
        try:
            periods = await self.item_periods(
                item, event.timestamp, api_key=api_key, customer=event.customer
            )
        except StoreUnavailableError as exc:  # expected while Redis is down: no traceback
            log.warning("billing period of %s unavailable (%s); using the UTC day", item, exc)
            periods = None
        except Exception:  # a ledger period must never fail a recorded event
            log.warning("billing period of %s unavailable; using the UTC day", item, exc_info=True)
            periods = None
        if periods is None:
            return Period.day_of(event.timestamp)
        return periods.containing(event.timestamp)

    async def item_periods(
        self, item: str, timestamp: int, *, api_key: str | None, customer: str | None = None
    ) -> ItemPeriods | None:
        """What is known of ``item`` for usage at ``timestamp``: cached, else read from Stripe,
        else (the read failed) the last known entry of the item or of ``customer``.

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        # Earlier periods follow from the cached entry; a timestamp past its end asks Stripe again
        # (once per item and period), as the subscription may have changed at the boundary.
        known = self._local.get(item)
        if known is not None and timestamp < known.end:
            return known
        async with store_errors("reading an item's billing period"):
            raw = as_str(await self._redis.get(self._keys.item_periods(item)))
        cached = ItemPeriods.model_validate_json(raw) if raw is not None else None
        if cached is not None and timestamp < cached.end:
            self._keep(item, cached)
            return cached
        found = await self._lookup(item, api_key)
        if found is not None:
            await self.remember(item, found)
            return found
        fallback = cached or known
        if fallback is None and customer is not None:
            async with store_errors("reading a customer's billing periods"):
                raw = as_str(await self._redis.get(self._keys.customer_periods(customer)))
            fallback = ItemPeriods.model_validate_json(raw) if raw is not None else None
        if fallback is not None:
            log.warning(
                "billing period of %s could not be read; computed from its known anchor", item
            )
        return fallback

    async def cached(self, item: str) -> ItemPeriods | None:
        """What is kept of ``item`` (its period may be over), without asking Stripe.

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        known = self._local.get(item)
        if known is not None:
            return known
        async with store_errors("reading an item's billing period"):
            raw = as_str(await self._redis.get(self._keys.item_periods(item)))
        if raw is None:
            return None
        cached = ItemPeriods.model_validate_json(raw)
        self._keep(item, cached)
        return cached

    def _keep(self, item: str, periods: ItemPeriods) -> None:
        # Bounded: past the cap the local copies are dropped and re-read from Redis as needed.
        if len(self._local) >= LOCAL_PERIODS_MAX and item not in self._local:
            self._local.clear()
        self._local[item] = periods

    async def remember(self, item: str, periods: ItemPeriods) -> None:
        """Keep an item's current period, read from Stripe by someone else (the proxy's mapping)."""
        self._keep(item, periods)
        ttl = max(60, int(periods.end - self._clock())) + ANCHOR_KEEP_SECONDS
        value = periods.model_dump_json()
        async with store_errors("caching an item's billing period"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self._keys.item_periods(item), value, ex=ttl)
            if periods.customer is not None:
                pipe.set(self._keys.customer_periods(periods.customer), value, ex=ttl)
            await pipe.execute()
