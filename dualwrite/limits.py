"""Stripe's rate limits, shared by every dualwrite process through Redis.

Two kinds of limit guard each write:

* a rate per path (legacy usage records, v1 meter events, v2 stream events), enforced with the
  generic cell rate algorithm (GCRA) in one Lua script over Redis's own clock, so that any number of
  processes on any number of machines together stay under it;
* at most one meter call in flight per customer and meter event name, as Stripe allows on the v1
  meter path: a short lease in Redis (released when the call returns, expiring if the process dies).

A write that cannot get its turn within ``max_wait`` is not lost: it is refused locally with a
retryable 429-like failure, so the outbox retries it later and the request path hands the caller a
``Retry-After``. Every wait is counted (``stats``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import redis.asyncio as aioredis

from dualwrite.config import LimitSettings
from dualwrite.exceptions import DualwriteError, StoreUnavailableError
from dualwrite.keys import KeySpace
from dualwrite.redis_client import as_int, store_errors

__all__ = ["LimitPath", "LimitStats", "RateLimitedError", "WriteLimits"]

log = logging.getLogger(__name__)

LimitPath = Literal["legacy", "meter", "stream", "reads"]
"""The Stripe paths with their own limits: usage records, v1 meter events, v2 stream events, and
the reads ``dualwrite reconcile`` makes."""

# KEYS: theoretical arrival time; ARGV: emission interval (µs), burst tolerance (µs), cost
# Returns 0 when admitted, else the microseconds to wait before asking again.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[1]) * tonumber(ARGV[3])
local allow_at = new_tat - tonumber(ARGV[2])
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RateLimitedError(DualwriteError):
    """A write did not get its turn within the allowed wait; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class LimitStats:
    """How often writes had to wait, and for how long in all."""

    waits: dict[str, int] = field(default_factory=dict)
    waited_seconds: dict[str, float] = field(default_factory=dict)
    refused: int = 0

    def note(self, what: str, seconds: float) -> None:
        """Count one wait."""
        self.waits[what] = self.waits.get(what, 0) + 1
        self.waited_seconds[what] = self.waited_seconds.get(what, 0.0) + seconds


class WriteLimits:
    """The shared limits every Stripe write goes through."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        settings: LimitSettings,
        *,
        reads_per_second: float = 0.0,
    ):
        self._redis = redis
        self._keys = keys
        self.settings = settings
        self._gcra = redis.register_script(_GCRA)
        self._release = redis.register_script(_RELEASE)
        self._rates: dict[LimitPath, float] = {
            "legacy": settings.legacy_per_second,
            "meter": settings.meter_per_second,
            "stream": settings.stream_events_per_second,
            "reads": reads_per_second,  # [reconcile] reads_per_second; 0: unlimited
        }
        self.stats = LimitStats()
        self._local_turns: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._releases: set[asyncio.Task[None]] = set()

    async def _count(self, what: str, *, waited: float = 0.0, held_back: bool = False) -> None:
        """Count a wait (or a write held back) here and in Redis, where the report reads it."""
        if held_back:
            self.stats.refused += 1
        else:
            self.stats.note(what, waited)
        try:
            async with store_errors("counting back-pressure"):
                pipe = self._redis.pipeline(transaction=False)
                if held_back:
                    pipe.hincrby(self._keys.backpressure, f"{what}_held_back", 1)
                else:
                    pipe.hincrby(self._keys.backpressure, f"{what}_waits", 1)
                    pipe.hincrby(self._keys.backpressure, f"{what}_waited_ms", int(waited * 1000))
                await pipe.execute()
        except StoreUnavailableError:
            pass  # counted locally; losing a counter must not stop a write

    async def take(self, path: LimitPath, *, cost: int = 1, max_wait: float) -> None:
        """Wait for ``cost`` units of ``path``'s rate.

        Raises:
            RateLimitedError: the turn did not come within ``max_wait`` seconds.
            StoreUnavailableError: Redis could not be reached.
        """
        rate = self._rates[path]
        if rate <= 0:
            return
        interval_us = 1_000_000 / rate
        burst_us = max(self.settings.burst_seconds * 1_000_000, interval_us * cost)
        key = self._keys.rate_limit(path)
        waited = 0.0
        while True:
            async with store_errors("taking a rate-limit token"):
                wait_us = as_int(await self._gcra(keys=[key], args=[interval_us, burst_us, cost]))
            if wait_us <= 0:
                if waited:
                    await self._count(path, waited=waited)
                return
            wait = wait_us / 1_000_000
            if waited + wait > max_wait:
                await self._count(path, held_back=True)
                msg = f"the {path} rate limit ({rate:g}/s) leaves no room within {max_wait:g}s"
                raise RateLimitedError(msg, retry_after=wait)
            await asyncio.sleep(wait)
            waited += wait

    @asynccontextmanager
    async def meter_turn(
        self, customer: str, event_name: str, *, max_wait: float
    ) -> AsyncIterator[None]:
        """Hold the one meter call allowed in flight for this customer and meter.

        Raises:
            RateLimitedError: another call kept the turn for longer than ``max_wait`` seconds.
        """
        if not self.settings.one_meter_call_per_customer:
            yield
            return
        key = self._keys.for_customer(customer).meter_turn(customer, event_name)
        # Calls of this process queue on a local lock first, so that only calls from different
        # processes ever poll Redis for the turn.
        local = self._local_turns.get(key)
        if local is None:
            local = self._local_turns[key] = asyncio.Lock()
        try:
            async with asyncio.timeout(max_wait):
                await local.acquire()
        except TimeoutError:
            await self._count("meter_turn", held_back=True)
            msg = f"another meter call for {customer}/{event_name} is still in flight"
            raise RateLimitedError(msg, retry_after=0.05) from None
        try:
            async with self._redis_turn(key, customer, event_name, max_wait=max_wait):
                yield
        finally:
            local.release()

    @asynccontextmanager
    async def _redis_turn(
        self, key: str, customer: str, event_name: str, *, max_wait: float
    ) -> AsyncIterator[None]:
        token = uuid.uuid4().hex
        lease_ms = int(self.settings.turn_lease_seconds * 1000)
        waited, pause = 0.0, 0.002
        while True:
            async with store_errors("taking a meter turn"):
                taken = await self._redis.set(key, token, nx=True, px=lease_ms)
            if taken:
                break
            if waited + pause > max_wait:
                await self._count("meter_turn", held_back=True)
                msg = f"another meter call for {customer}/{event_name} is still in flight"
                raise RateLimitedError(msg, retry_after=pause)
            await asyncio.sleep(pause)
            waited += pause
            pause = min(pause * 2, 0.05)
        if waited:
            await self._count("meter_turn", waited=waited)
        try:
            yield
        finally:
            try:
                async with store_errors("releasing a meter turn"):
                    await self._release(keys=[key], args=[token])
            except StoreUnavailableError:
                # A Redis with persistence keeps the lease across a restart: release it as soon as
                # Redis answers again, rather than hold the customer's meter calls for the lease.
                log.warning("could not release a meter turn (Redis); retrying in the background")
                task = asyncio.create_task(self._release_later(key, token))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    async def _release_later(self, key: str, token: str) -> None:
        deadline = time.monotonic() + self.settings.turn_lease_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            try:
                async with store_errors("releasing a meter turn"):
                    await self._release(keys=[key], args=[token])
                return
            except StoreUnavailableError:
                continue
