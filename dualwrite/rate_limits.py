"""Stripe's rate limits, shared by every dualwrite process through Redis.

Two kinds of limit guard each write:

* a rate per path (legacy usage records, v1 meter events, v2 stream events), enforced with the
  generic cell rate algorithm (GCRA) in one Lua script over Redis's own clock, so that any number of
  processes on any number of machines together stay under it;
* at most one meter call in flight per customer and meter event name, as Stripe allows on the v1
  meter path: a short lease in Redis (released when the call returns, expiring if the process dies).

A process taking single units of a fast rate (the v1 meter path at 1,000/s) takes them from the
shared GCRA in blocks, sized to what it used of the last block, and spends them locally: one Redis
round trip per block instead of per write. A block's units expire ``W`` (a quarter of
``burst_seconds``) after the block was asked for, and every take on such a path runs the GCRA with
its burst tolerance shortened by ``W``. Units spent late therefore still fit the limit: what is spent
in any window of length ``L`` was granted within ``L + W``, and the shortened burst keeps that at
``rate * (L + burst_seconds)``, the bound single takes with the full burst have.

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
from typing import TYPE_CHECKING, Literal

import redis.asyncio as aioredis

from dualwrite import instruments
from dualwrite.config import LimitSettings
from dualwrite.exceptions import RateLimitedError, StoreUnavailableError
from dualwrite.keys import KeySpace
from dualwrite.redis_client import as_int, store_errors

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["LimitPath", "LimitStats", "MeterTurn", "RateLimitedError", "TokenAsk", "WriteLimits"]

log = logging.getLogger(
    "dualwrite.limits"
)  # the name it logged under before the module was renamed

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

# Blocks of units: at most this many at once, spent within a quarter of the burst tolerance. A path
# with fewer than four units in that quarter (legacy usage records at 100/s) takes them one by one:
# blocks would gain little there and shorten its burst.
_MAX_BLOCK = 16
_MIN_BLOCK = 4
_BLOCK_SHARE_OF_BURST = 0.25

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Units granted to a write that was then not made (a token taken in the claim's round trip, for a
# claim that turned out to be a replay): the theoretical arrival time moves back by their
# emission intervals, as if they had never been taken; a time no later than now is as good as none.
# KEYS: theoretical arrival time; ARGV: emission interval (µs), cost
_REFUND = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local back = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if back <= now then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('SET', KEYS[1], back, 'PX', math.ceil((back - now) / 1000) + 1000)
return 1
"""


@dataclass(slots=True)
class LimitStats:
    """How often writes had to wait, for how long in all, and how often the shared rate granted."""

    waits: dict[str, int] = field(default_factory=dict)
    waited_seconds: dict[str, float] = field(default_factory=dict)
    refused: int = 0
    grants: dict[str, int] = field(default_factory=dict)
    """Round trips to the shared rate that granted units, per path (a block counts once)."""

    def note(self, what: str, seconds: float) -> None:
        """Count one wait."""
        self.waits[what] = self.waits.get(what, 0) + 1
        self.waited_seconds[what] = self.waited_seconds.get(what, 0.0) + seconds


@dataclass(slots=True)
class MeterTurn:
    """A held meter turn: the lease key and this holder's token.

    Whoever releases the lease in Redis on the holder's behalf (the outbox's settle script does, in
    the settle's round trip) sets ``released``, and leaving ``meter_turn`` then skips its own release.
    """

    key: str
    token: str
    released: bool = False


@dataclass(frozen=True, slots=True)
class TokenAsk:
    """One unit of a path's shared rate, asked for in another call's round trip (the legacy
    token sent with the claim, ``IdempotencyStore.claim_riding``): the GCRA script's call."""

    path: LimitPath
    script: AsyncScript
    keys: list[str]
    args: list[float]


@dataclass(slots=True)
class _Bucket:
    """Units of one path granted to this process in a block, not yet spent."""

    left: int = 0
    expires: float = 0.0
    size: int = 0
    used: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
        self._refund = redis.register_script(_REFUND)
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
        self._buckets: dict[LimitPath, _Bucket] = {}

    async def _count(self, what: str, *, waited: float = 0.0, held_back: bool = False) -> None:
        """Count a wait (or a write held back) here and in Redis, where the report reads it."""
        instruments.count_rate_limit(what, waited, held_back)
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
        interval_us, burst_us, window_us, largest = self._shape(path)
        if largest < _MIN_BLOCK:
            await self._take_shared(path, cost, burst_us, max_wait=max_wait)
            return
        burst_us -= window_us  # units of a block may be spent up to ``window_us`` after the grant
        if cost > 1:
            await self._take_shared(path, cost, burst_us, max_wait=max_wait)
            return
        bucket = self._buckets.get(path)
        if bucket is None:
            bucket = self._buckets[path] = _Bucket()
        if bucket.left and time.monotonic() < bucket.expires:
            bucket.left -= 1
            bucket.used += 1
            return
        try:
            if bucket.lock.locked():
                async with asyncio.timeout(max_wait):
                    await bucket.lock.acquire()
            else:
                await bucket.lock.acquire()
        except TimeoutError:
            await self._count(path, held_back=True)
            msg = f"the {path} rate limit ({rate:g}/s) leaves no room within {max_wait:g}s"
            raise RateLimitedError(msg, retry_after=interval_us / 1_000_000) from None
        try:
            if bucket.left and time.monotonic() < bucket.expires:  # refilled while we queued
                bucket.left -= 1
                bucket.used += 1
                return
            # Twice the last block if it was used up before it expired, else what was used of it.
            grow = bucket.left == 0 and time.monotonic() < bucket.expires
            size = min(largest, max(1, bucket.size * 2 if grow else bucket.used))
            asked = await self._take_shared(path, size, burst_us, max_wait=max_wait)
            bucket.size, bucket.used, bucket.left = size, 1, size - 1
            bucket.expires = asked + window_us / 1_000_000
        finally:
            bucket.lock.release()

    def single_ask(self, path: LimitPath) -> TokenAsk | None:
        """The call that takes one unit of ``path`` from the shared rate, to send in another
        call's round trip; None when ``path`` is unlimited or takes its units in blocks (then a
        write costs no round trip of its own to save). Read its reply with ``granted``."""
        if self._rates[path] <= 0:
            return None
        _, burst_us, _, largest = self._shape(path)
        if largest >= _MIN_BLOCK:
            return None
        args = self._gcra_args(path, burst_us, 1)
        return TokenAsk(path, self._gcra, [self._keys.rate_limit(path)], args)

    def _shape(self, path: LimitPath) -> tuple[float, float, float, int]:
        """A limited path's emission interval and burst (µs), the window a block's units may be
        spent in (µs), and the largest block (below ``_MIN_BLOCK``: units are taken one by one)."""
        interval_us = 1_000_000 / self._rates[path]
        burst_us = self.settings.burst_seconds * 1_000_000
        window_us = burst_us * _BLOCK_SHARE_OF_BURST
        return interval_us, burst_us, window_us, min(_MAX_BLOCK, int(window_us / interval_us))

    def _gcra_args(self, path: LimitPath, burst_us: float, cost: int) -> list[float]:
        """The GCRA script's arguments for ``cost`` units (the burst holds at least those)."""
        interval_us = 1_000_000 / self._rates[path]
        return [interval_us, max(burst_us, interval_us * cost), cost]

    def granted(self, ask: TokenAsk, reply: object) -> bool:
        """Whether ``reply`` (the ask's, or the error it raised) granted the unit; if not, the
        write takes its unit itself, waiting as ``take`` does."""
        if isinstance(reply, BaseException) or as_int(reply, default=1) > 0:
            return False
        self.stats.grants[ask.path] = self.stats.grants.get(ask.path, 0) + 1
        return True

    async def refund(self, ask: TokenAsk) -> None:
        """Give back a unit granted by ``ask`` to a write that is not made (a replayed or busy
        claim). Losing one to a Redis error only leaves the rate a unit under its limit."""
        try:
            async with store_errors("giving a rate-limit token back"):
                await self._refund(keys=ask.keys, args=[ask.args[0], ask.args[2]])
        except StoreUnavailableError:
            log.warning("could not give a %s rate-limit token back (Redis)", ask.path)

    async def _take_shared(
        self, path: LimitPath, cost: int, burst_us: float, *, max_wait: float
    ) -> float:
        """Take ``cost`` units from the shared GCRA; returns when (monotonic) the granting call
        was sent, which is no later than Redis granted them."""
        rate = self._rates[path]
        args = self._gcra_args(path, burst_us, cost)
        key = self._keys.rate_limit(path)
        waited = 0.0
        while True:
            asked = time.monotonic()
            async with store_errors("taking a rate-limit token"):
                wait_us = as_int(await self._gcra(keys=[key], args=args))
            if wait_us <= 0:
                self.stats.grants[path] = self.stats.grants.get(path, 0) + 1
                if waited:
                    await self._count(path, waited=waited)
                return asked
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
    ) -> AsyncIterator[MeterTurn | None]:
        """Hold the one meter call allowed in flight for this customer and meter (None: turns are
        off); the lease is released on leaving, unless the turn says it was released already.

        Raises:
            RateLimitedError: another call kept the turn for longer than ``max_wait`` seconds.
        """
        if not self.settings.one_meter_call_per_customer:
            yield None
            return
        key = self._keys.for_customer(customer).meter_turn(customer, event_name)
        # Calls of this process queue on a local lock first, so that only calls from different
        # processes ever poll Redis for the turn.
        local = self._local_turns.get(key)
        if local is None:
            local = self._local_turns[key] = asyncio.Lock()
        try:
            if local.locked():  # a timer only when there is something to wait for
                async with asyncio.timeout(max_wait):
                    await local.acquire()
            else:
                await local.acquire()
        except TimeoutError:
            await self._count("meter_turn", held_back=True)
            msg = f"another meter call for {customer}/{event_name} is still in flight"
            raise RateLimitedError(msg, retry_after=0.05) from None
        try:
            async with self._redis_turn(key, customer, event_name, max_wait=max_wait) as turn:
                yield turn
        finally:
            local.release()

    @asynccontextmanager
    async def _redis_turn(
        self, key: str, customer: str, event_name: str, *, max_wait: float
    ) -> AsyncIterator[MeterTurn]:
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
        turn = MeterTurn(key, token)
        try:
            yield turn
        finally:
            if not turn.released:
                await self._release_turn(turn)

    async def _release_turn(self, turn: MeterTurn) -> None:
        try:
            async with store_errors("releasing a meter turn"):
                await self._release(keys=[turn.key], args=[turn.token])
        except StoreUnavailableError:
            # A Redis with persistence keeps the lease across a restart: release it as soon as
            # Redis answers again, rather than hold the customer's meter calls for the lease.
            log.warning("could not release a meter turn (Redis); retrying in the background")
            task = asyncio.create_task(self._release_later(turn.key, turn.token))
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
