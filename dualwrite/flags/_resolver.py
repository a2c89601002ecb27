"""``StageResolver``: a customer's stage on the request path, cached, invalidated over pub/sub.

A cache hit is a dict lookup and a clock call. A miss reads one ``FlagSnapshot`` (one round trip)
and resolves it. Every flag change is published by ``RedisFlagStore``; a background task subscribed
to the flags channel drops the customer's entry (or all of them for ``*``), and the TTL is the
safety net when a message is lost. When Redis fails, the configured safe stage is returned and
nothing raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import filterfalse
from types import TracebackType
from typing import Any, Self

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from dualwrite import instruments
from dualwrite.config import FlagSettings
from dualwrite.exceptions import ConfigError, StoreUnavailableError
from dualwrite.flags._codec import Throttle
from dualwrite.flags._models import CustomerBilling, Resolution
from dualwrite.flags._resolution import resolve_snapshot, rollout_stages, stage_only
from dualwrite.flags._store import GLOBAL, RedisFlagStore
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.redis_client import as_str, open_pubsub
from dualwrite.test_clocks import FrozenTimes, customer_now

__all__ = ["ResolverStats", "StageResolver"]

logger = logging.getLogger("dualwrite.flags")

#: At most one "Redis unavailable" warning per this many seconds.
WARN_INTERVAL = 10.0
#: After a failed lookup, misses answer the safe stage without asking Redis for this long, so that a
#: Redis outage costs each request one failed attempt at most, not one connect timeout each.
SAFE_HOLD = 0.25
_POLL = 1.0
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 5.0

#: How long closing the flag-change subscription may take before shutdown goes on without it.
_CLOSE_SECONDS = 5.0
_LOOKUP_ERRORS = (StoreUnavailableError, RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class ResolverStats:
    """Counters of one resolver since it was created."""

    hits: int
    """Resolutions answered from the local cache."""
    misses: int
    """Lookups that went to Redis (failed ones included)."""
    safe_fallbacks: int
    """Resolutions answered with the safe stage because Redis failed."""
    invalidations: int
    """Cache invalidations (pub/sub messages, reconnects and ``invalidate()`` calls)."""


class StageResolver:
    """Resolves customers' stages from the flags in Redis, with a local cache.

    Call ``start()`` (or use ``async with``) to subscribe to flag changes; without it, cached
    resolutions only expire with ``settings.cache_ttl``. The Redis client is not closed by
    ``aclose()``: it belongs to the caller.

    Args:
        redis: a client with ``decode_responses=True`` (``dualwrite.redis_client.open_redis``).
        keys: the key layout.
        settings: safe stage, cache TTL and rollout salt.
        clock: Unix time; schedules and cache expiry follow it (a customer living on a Stripe
            test clock: its schedule follows the clock's frozen time, read by ``test_clocks``).
        test_clocks: tells test clocks' frozen times (``dualwrite.test_clocks``); without it a
            customer on a test clock is judged by ``clock``.
        lookup_timeout: seconds a miss may wait for Redis before answering the safe stage.
        max_entries: cache size; beyond it expired entries, then the oldest, are dropped.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        settings: FlagSettings,
        *,
        clock: Callable[[], float] = time.time,
        lookup_timeout: float = 1.0,
        max_entries: int = 100_000,
        test_clocks: FrozenTimes | None = None,
    ) -> None:
        if lookup_timeout <= 0 or max_entries < 1:
            msg = (
                f"lookup_timeout must be > 0 and max_entries >= 1, got {lookup_timeout} and "
                f"{max_entries}"
            )
            raise ConfigError(msg)
        self._redis = redis
        self._channel = keys.flags_channel
        self._store = RedisFlagStore(redis, keys, clock=clock)
        self._settings = settings
        self._clock = clock
        self._test_clocks = test_clocks
        self._ttl = settings.cache_ttl
        self._salt = settings.rollout_salt
        self._lookup_timeout = lookup_timeout
        self._max_entries = max_entries
        # customer -> (expires_at, stage, resolution): the hit path reads a tuple, nothing else.
        self._cache: dict[str, tuple[float, Stage, Resolution]] = {}
        # customer -> its Stripe test clock, as its last lookup read it (only customers on one)
        self._clocks: dict[str, str] = {}
        self._epoch = 0
        self._hits = 0
        self._misses = 0
        self._safe_fallbacks = 0
        self._invalidations = 0
        self._unwarned_failures = 0
        self._hold_until = 0.0
        self._throttle = Throttle(WARN_INTERVAL)
        self._safe = Resolution(
            stage=settings.safe_stage,
            reason="safe",
            detail=f"flags unreadable in Redis: safe stage {settings.safe_stage.value}",
        )
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        instruments.track_resolver(self)

    def __del__(self) -> None:
        # A resolver dropped without ceremony (an engine rebuilt, a test's) keeps its counts in
        # the process's totals: Prometheus counters must never go down.
        instruments.untrack_resolver(self)

    @property
    def stats(self) -> ResolverStats:
        """The counters so far: hits, misses, safe_fallbacks, invalidations."""
        return ResolverStats(self._hits, self._misses, self._safe_fallbacks, self._invalidations)

    @property
    def test_clocks(self) -> FrozenTimes | None:
        """What tells the Stripe test clocks' frozen times, if anything does."""
        return self._test_clocks

    @property
    def subscribed(self) -> bool:
        """Whether the resolver is currently listening to flag changes."""
        return self._subscribed.is_set()

    async def resolve(self, customer: str) -> Stage:
        """The customer's stage; never raises (the safe stage when Redis fails)."""
        entry = self._cache.get(customer)
        if entry is not None and entry[0] > self._clock():
            self._hits += 1
            return entry[1]
        return (await self._lookup(customer)).stage

    async def explain(self, customer: str) -> Resolution:
        """The customer's stage with the rule that decided it; never raises."""
        entry = self._cache.get(customer)
        if entry is not None and entry[0] > self._clock():
            self._hits += 1
            return entry[2]
        return await self._lookup(customer)

    async def resolve_many(self, customers: Iterable[str]) -> dict[str, Stage]:
        """The stages of many customers from five Redis reads (for reports over thousands of
        customers); every customer gets the safe stage when Redis fails. Bypasses the cache."""
        wanted = list(customers)
        try:
            kill = await self._store.get_kill()
            default = await self._store.get_default()
            rollout = await self._store.get_rollout()
            overrides = await self._store.overrides()
            schedules = await self._store.schedules()
            billings = await self._store.billings()
        except StoreUnavailableError:
            return dict.fromkeys(wanted, self._settings.safe_stage)
        now, salt = self._clock(), self._salt
        # Most customers have no override, schedule or billing record: without a kill switch their
        # stage is the rollout's or the default, resolved all at once (a million for a report),
        # and only the others one by one (a coroutine only for a customer on a test clock).
        stages: dict[str, Stage] = {}
        if not kill:
            decided = overrides.keys() | schedules.keys() | billings.keys()
            plain = list(filterfalse(decided.__contains__, wanted)) if decided else wanted
            stages = dict(zip(plain, rollout_stages(plain, rollout, default, salt), strict=True))
            wanted = list(filter(decided.__contains__, wanted)) if decided else []
        none = CustomerBilling()
        for customer in wanted:
            billing = billings.get(customer, none)
            clock = billing.test_clock
            stages[customer] = stage_only(
                customer,
                kill=kill,
                override=overrides.get(customer),
                schedule=schedules.get(customer, ()),
                rollout=rollout,
                default=default,
                now=now if clock is None else await customer_now(clock, self._test_clocks, now),
                salt=salt,
                price_move_at=billing.price_move_at,
            )
        return stages

    async def test_clock_now(self, customer: str) -> float | None:
        """The frozen time of the Stripe test clock ``customer`` lives on, as its last lookup
        (``resolve``) found it; None for a customer on no clock, or never looked up, or whose
        clock was never read. The clock's reading is kept a few seconds (``test_clocks``), so
        this reads neither Redis nor, mostly, Stripe."""
        clock = self._clocks.get(customer)
        if clock is None or self._test_clocks is None:
            return None
        try:
            return await self._test_clocks.frozen_time(clock)
        except Exception:  # a bug must not fail a usage request: log it, use the process clock
            logger.exception("reading test clock %s failed: using the process clock", clock)
            return None

    def invalidate(self, customer: str | None = None) -> None:
        """Drop ``customer``'s cached resolution, or every one when ``None``."""
        self._epoch += 1
        self._invalidations += 1
        if customer is None:
            self._cache.clear()
        else:
            self._cache.pop(customer, None)

    async def _lookup(self, customer: str) -> Resolution:
        if time.monotonic() < self._hold_until:
            self._safe_fallbacks += 1
            return self._safe
        epoch = self._epoch
        self._misses += 1
        try:
            async with asyncio.timeout(self._lookup_timeout):
                snapshot = await self._store.snapshot(customer)
        except _LOOKUP_ERRORS as exc:
            return self._fall_back(exc)
        except Exception as exc:  # a bug must not fail a usage request: log it, answer safe
            return self._fall_back(exc, unexpected=True)
        now = self._clock()
        clock = snapshot.billing.test_clock
        if clock is not None:
            self._clocks[customer] = clock
        else:
            self._clocks.pop(customer, None)
        try:
            own = await customer_now(clock, self._test_clocks, now)
        except Exception as exc:  # a bug must not fail a usage request: log it, answer safe
            return self._fall_back(exc, unexpected=True)
        resolution = resolve_snapshot(customer, snapshot, now=own, salt=self._salt)
        if self._ttl > 0 and epoch == self._epoch:
            expires_at = now + self._ttl
            if resolution.valid_until is not None and clock is None:
                expires_at = min(expires_at, resolution.valid_until)
            elif resolution.valid_until is not None and resolution.valid_until <= own + self._ttl:
                # On a test clock the entry falls due when someone advances it: not cached.
                expires_at = now
            self._store_entry(customer, (expires_at, resolution.stage, resolution))
        return resolution

    def _store_entry(self, customer: str, entry: tuple[float, Stage, Resolution]) -> None:
        cache = self._cache
        if len(cache) >= self._max_entries and customer not in cache:
            now = self._clock()
            for key in [key for key, held in cache.items() if held[0] <= now]:
                del cache[key]
            while len(cache) >= self._max_entries:
                del cache[next(iter(cache))]
        cache[customer] = entry

    def _fall_back(self, exc: BaseException, *, unexpected: bool = False) -> Resolution:
        self._safe_fallbacks += 1
        self._unwarned_failures += 1
        self._hold_until = time.monotonic() + SAFE_HOLD
        if self._throttle.ready("unexpected" if unexpected else "unavailable"):
            # The type only: redis-py messages may carry the server address (a URL, a password).
            logger.warning(
                "stage lookup failed (%s): answering the safe stage %s (%d time(s) since the last "
                "warning)",
                type(exc).__name__,
                self._settings.safe_stage.value,
                self._unwarned_failures,
                exc_info=exc if unexpected else None,
            )
            self._unwarned_failures = 0
        return self._safe

    # -- invalidation --------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to flag changes in a background task; waits (up to ``lookup_timeout``) for the
        subscription, and never fails: if Redis is down, the task keeps retrying."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._listen(), name="dualwrite-flag-invalidation")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._lookup_timeout):
                await self._subscribed.wait()

    async def aclose(self) -> None:
        """Stop listening to flag changes (the cache keeps expiring by TTL)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            async with asyncio.timeout(2 * _CLOSE_SECONDS):
                await task
        except TimeoutError:
            logger.warning("the flag-change listener did not stop in time; leaving it behind")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _listen(self) -> None:
        delay = _BACKOFF_MIN
        while True:
            pubsub: Any = None
            connection: Any = None
            try:
                pubsub = await open_pubsub(self._redis)
                await pubsub.subscribe(self._channel)
                connection = pubsub.connection
                if connection is not None:
                    # redis-py reconnects and resubscribes by itself; messages sent meanwhile
                    # are lost, so every reconnect drops the whole cache.
                    connection.register_connect_callback(self._on_reconnect)
                # Changes made while we were not listening were missed.
                self.invalidate()
                self._subscribed.set()
                delay = _BACKOFF_MIN
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_POLL
                    )
                    if message is not None and message.get("type") == "message":
                        target = as_str(message.get("data")) or GLOBAL
                        self.invalidate(None if target == GLOBAL else target)
            except (RedisError, OSError) as exc:
                self._lost_subscription(exc)
            except Exception as exc:  # keep listening whatever happens; the TTL covers the gap
                self._lost_subscription(exc, unexpected=True)
            finally:
                if connection is not None:
                    connection.deregister_connect_callback(self._on_reconnect)
                if pubsub is not None:
                    # Bounded: a close that never returns would hang the process's shutdown.
                    with contextlib.suppress(RedisError, OSError, TimeoutError):
                        async with asyncio.timeout(_CLOSE_SECONDS):
                            await pubsub.aclose()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX)

    def _lost_subscription(self, exc: BaseException, *, unexpected: bool = False) -> None:
        self._subscribed.clear()
        self.invalidate()
        if self._throttle.ready("pubsub"):
            logger.warning(
                "lost the flag change subscription (%s); resubscribing, cached stages dropped",
                type(exc).__name__,
                exc_info=exc if unexpected else None,
            )

    def _on_reconnect(self, connection: object) -> None:
        """redis-py reconnected the subscription: changes may have been missed meanwhile."""
        self.invalidate()
