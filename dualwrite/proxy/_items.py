"""Subscription item → (customer, meter event name), for the usage records the proxy intercepts.

Looked up in order: ``settings.items`` (known in advance); the Redis cache every proxy process
shares; then Stripe, read once with the caller's own key (the item at the pre-basil API version for
its price id and lookup key, then its subscription for the customer). The price id, else the lookup
key, names the meter through ``settings.meters`` (``legacy_prices`` / ``lookup_keys``).

What is cached is the mapping and a digest of the meter configuration it came from (a changed
mapping invalidates it), never the caller's key. An item whose price maps to no meter is remembered
as unmapped for a few minutes, so that its usage is forwarded without a Stripe read on every
request. Every usage request forwarded without a mapping that Stripe accepted is counted per item
(``P:{items}:unmapped``, at most ``UNMAPPED_ITEMS_MAX`` items, the rest together); the report
shows the count.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import redis.asyncio as aioredis

from dualwrite.config import Settings
from dualwrite.exceptions import ConfigError, StoreUnavailableError
from dualwrite.instruments import count_unmapped
from dualwrite.keys import KeySpace
from dualwrite.models import StripeFailure
from dualwrite.redis_client import as_str, store_errors
from dualwrite.stripe_io import ItemDetails

__all__ = [
    "ITEM_CACHE_TTL_SECONDS",
    "OTHER_ITEMS",
    "UNMAPPED_CACHE_TTL_SECONDS",
    "UNMAPPED_ITEMS_MAX",
    "UNMAPPED_LOG_SECONDS",
    "ItemLookup",
    "ItemResolver",
    "LookupFailed",
    "LookupResult",
    "Mapped",
    "Unmapped",
]

log = logging.getLogger("dualwrite.proxy")

#: How long a looked-up mapping is cached. An item never changes subscription or customer; only
#: its price can move (at cutover), and the meter configuration's digest guards the event name.
ITEM_CACHE_TTL_SECONDS = 7 * 86400
#: How long "this item maps to no meter" is remembered (adding a mapping takes effect after this).
UNMAPPED_CACHE_TTL_SECONDS = 300
#: Distinct items counted as unmapped; past it, further items are counted together.
UNMAPPED_ITEMS_MAX = 10_000
#: The field the items past ``UNMAPPED_ITEMS_MAX`` are counted in.
OTHER_ITEMS = "(other items)"
#: At most one "forwarded, not dual-written" line per this many seconds (per process).
UNMAPPED_LOG_SECONDS = 60.0

# KEYS: the unmapped counts; ARGV: item, cap, the overflow field. The item's own count while the
# hash holds fewer than ``cap`` items (or already holds it), else the overflow field's.
_COUNT_UNMAPPED = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('HLEN', KEYS[1]) < tonumber(ARGV[2]) then
  return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
return redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
"""


@dataclass(frozen=True, slots=True)
class Mapped:
    """The item's usage is dual-written for ``customer`` under ``event_name``."""

    customer: str
    event_name: str
    source: Literal["config", "cache", "stripe"]


@dataclass(frozen=True, slots=True)
class Unmapped:
    """The item's usage is forwarded untouched (and counted); ``reason`` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class LookupFailed:
    """Stripe did not tell us about the item (its refusal, or a network failure)."""

    failure: StripeFailure


LookupResult = Mapped | Unmapped | LookupFailed
"""What the resolver found out about an item."""


class ItemLookup(Protocol):
    """Reads a subscription item from Stripe (``StripeWriter`` in production)."""

    async def retrieve_item(self, item: str, *, api_key: str) -> ItemDetails | StripeFailure:
        """The item's subscription, customer, price and lookup key, or Stripe's refusal."""
        ...


def _meter_maps(settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    by_price: dict[str, str] = {}
    by_lookup_key: dict[str, str] = {}
    for meter in settings.meters:
        for table, names, what in (
            (by_price, meter.legacy_prices, "legacy_prices"),
            (by_lookup_key, meter.lookup_keys, "lookup_keys"),
        ):
            for name in names:
                other = table.setdefault(name, meter.event_name)
                if other != meter.event_name:
                    msg = (
                        f"[[meters]] {what}: {name!r} is listed under both {other!r} and "
                        f"{meter.event_name!r}; a price's usage belongs to one meter"
                    )
                    raise ConfigError(msg)
    return by_price, by_lookup_key


class ItemResolver:
    """Maps subscription items to customers and meter event names (see the module docstring).

    Raises:
        ConfigError: a price id or lookup key is listed under two meters.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        redis: aioredis.Redis,
        keys: KeySpace,
        lookup: ItemLookup,
        cache_ttl: int = ITEM_CACHE_TTL_SECONDS,
        unmapped_ttl: int = UNMAPPED_CACHE_TTL_SECONDS,
    ):
        self._items = settings.items
        self._by_price, self._by_lookup_key = _meter_maps(settings)
        config = json.dumps([sorted(self._by_price.items()), sorted(self._by_lookup_key.items())])
        self._digest = hashlib.sha256(config.encode()).hexdigest()[:16]
        self._redis = redis
        self._keys = keys
        self._lookup = lookup
        self._cache_ttl = cache_ttl
        self._unmapped_ttl = unmapped_ttl
        # One Stripe read per item (and caller key) at a time, however many requests wait for it.
        self._inflight: dict[tuple[str, str], asyncio.Future[LookupResult]] = {}
        self._count_unmapped = redis.register_script(_COUNT_UNMAPPED)
        self._logged_at = -UNMAPPED_LOG_SECONDS
        self._unlogged = 0

    async def resolve(self, item: str, *, api_key: str) -> LookupResult:
        """The mapping of ``item``: from config, the cache, or Stripe (read with ``api_key``)."""
        known = self._items.get(item)
        if known is not None:
            return Mapped(known.customer, known.event_name, "config")
        cached = await self._cached(item)
        if cached is not None:
            return cached
        flight = (item, api_key)
        future = self._inflight.get(flight)
        if future is None:
            future = asyncio.ensure_future(self._look_up(item, api_key))
            self._inflight[flight] = future
            future.add_done_callback(lambda _: self._inflight.pop(flight, None))
        return await asyncio.shield(future)

    async def count_unmapped(self, item: str, reason: str) -> None:
        """Count one usage request Stripe accepted for ``item`` without a dual write (the count
        set holds at most ``UNMAPPED_ITEMS_MAX`` items; the line saying so is logged at most
        once a minute, with how many it stood for)."""
        count_unmapped()
        now = time.monotonic()
        if now - self._logged_at < UNMAPPED_LOG_SECONDS:
            self._unlogged += 1
        else:
            more = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
            log.warning(
                "usage for subscription item %s is forwarded, not dual-written: %s%s",
                item,
                reason,
                more,
            )
            self._logged_at, self._unlogged = now, 0
        try:
            async with store_errors("counting an unmapped item"):
                await self._count_unmapped(
                    keys=[self._keys.items_unmapped], args=[item, UNMAPPED_ITEMS_MAX, OTHER_ITEMS]
                )
        except StoreUnavailableError:
            log.warning("Redis unavailable: unmapped usage for %s not counted", item)

    async def _cached(self, item: str) -> LookupResult | None:
        try:
            async with store_errors("reading an item mapping"):
                raw = as_str(await self._redis.get(self._keys.item_mapping(item)))
        except StoreUnavailableError:
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("config") != self._digest:
            return None
        if "unmapped" in data:
            return Unmapped(str(data["unmapped"]))
        return Mapped(str(data["customer"]), str(data["event_name"]), "cache")

    async def _look_up(self, item: str, api_key: str) -> LookupResult:
        details = await self._lookup.retrieve_item(item, api_key=api_key)
        if isinstance(details, StripeFailure):
            return LookupFailed(details)
        event_name = self._by_price.get(details.price or "") or self._by_lookup_key.get(
            details.lookup_key or ""
        )
        record: dict[str, str] = {"config": self._digest}
        resolution: LookupResult
        if event_name is None:
            key = f" (lookup key {details.lookup_key})" if details.lookup_key else ""
            reason = (
                f"its price {details.price}{key} is in no [[meters]] legacy_prices or lookup_keys"
            )
            resolution, ttl = Unmapped(reason), self._unmapped_ttl
            record["unmapped"] = reason
        else:
            resolution, ttl = Mapped(details.customer, event_name, "stripe"), self._cache_ttl
            record.update(customer=details.customer, event_name=event_name)
        try:
            async with store_errors("caching an item mapping"):
                await self._redis.set(self._keys.item_mapping(item), json.dumps(record), ex=ttl)
        except StoreUnavailableError:
            log.warning("Redis unavailable: mapping of %s not cached", item)
        return resolution
