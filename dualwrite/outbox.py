"""The outbox: shadow writes in a Redis Stream, and the workers that deliver them to Stripe.

Delivery is at-least-once; the effect is exactly-once because

* every write to Stripe carries the event's deterministic per-leg idempotency key (and, for meter
  events, a deterministic ``identifier``), so Stripe applies a re-sent write once; and
* every state change a worker makes after a write (acknowledge, update the ledger, log a divergence,
  dead-letter, reschedule) is one Lua script that first acknowledges the entry and does nothing else
  unless that acknowledgement removed it from the pending list. A slow worker whose entry was claimed
  by another therefore cannot count it a second time.

Retryable failures leave the stream for a sorted set scored by their due time (exponential backoff
with jitter, at least ``Retry-After``) and come back when due. Permanent failures, and entries older
than ``max_age_seconds``, go to the dead-letter stream and the divergence log. Entries left pending by
a dead worker are claimed by the living after ``claim_idle_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import ResponseError

from dualwrite.config import OutboxSettings
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.ledger import Ledger, LedgerUpdate, LegView, describe_failure, divergence_fields
from dualwrite.models import Leg, Stage, UsageEvent, WriteResult
from dualwrite.redis_client import as_int, store_errors, stream_entries, streams_reply
from dualwrite.stripe_io import RETIRED_LEGACY_MARKER, StripeWriter

__all__ = ["OUTBOX_GROUP", "Outbox", "OutboxDepth", "OutboxEntry", "OutboxWorker"]

log = logging.getLogger(__name__)

OUTBOX_GROUP = "dualwrite-workers"
DEAD_MAXLEN = 1_000_000

# KEYS: outbox, ledger hash, ledger index, divergence, dead letters
# ARGV: group, entry id, index member, index score, divergence maxlen, dead maxlen,
#       then three lists, each a count followed by name/value pairs: increments, divergence, dead letter
_SETTLE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
local i = 7
local function pairs_at()
  local n = tonumber(ARGV[i]); i = i + 1
  local out = {}
  for _ = 1, n do out[#out + 1] = ARGV[i]; out[#out + 1] = ARGV[i + 1]; i = i + 2 end
  return out
end
local incr = pairs_at()
for j = 1, #incr, 2 do redis.call('HINCRBY', KEYS[2], incr[j], incr[j + 1]) end
if #incr > 0 then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3]) end
local div = pairs_at()
if #div > 0 then redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', unpack(div)) end
local dead = pairs_at()
if #dead > 0 then redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', unpack(dead)) end
return 1
"""

# KEYS: outbox, retry set; ARGV: group, entry id, due time, payload
_RESCHEDULE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# KEYS: retry set, outbox; ARGV: now, limit
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, payload in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'entry', payload)
  redis.call('ZREM', KEYS[1], payload)
end
return #due
"""


class OutboxEntry(BaseModel):
    """A shadow write waiting for delivery."""

    model_config = ConfigDict(frozen=True)

    event: UsageEvent
    leg: Leg
    value: int
    """The effective quantity this leg carries (a translated ``set`` carries a difference)."""
    stage: Stage
    authoritative_id: str | None = None
    enqueued_at: float
    attempt: int = 0
    last_error: str | None = None

    def payload(self) -> str:
        """The JSON stored in the stream."""
        return self.model_dump_json()

    @classmethod
    def parse(cls, payload: str) -> OutboxEntry:
        """Read an entry back from its stream payload."""
        return cls.model_validate_json(payload)


class OutboxDepth(BaseModel):
    """How much work the outbox holds, over all shards."""

    model_config = ConfigDict(frozen=True)

    ready: int
    """Entries in the streams (waiting or being delivered)."""
    pending: int
    """Entries delivered to a worker and not yet acknowledged."""
    scheduled: int
    """Entries waiting out a retry backoff."""
    dead: int

    @property
    def outstanding(self) -> int:
        """Entries not yet settled."""
        return self.ready + self.scheduled


class Outbox:
    """The outbox streams of every shard, and the atomic steps workers take on them."""

    def __init__(
        self, redis: aioredis.Redis, keys: KeySpace, settings: OutboxSettings, ledger: Ledger
    ):
        self._redis = redis
        self.keys = keys
        self.settings = settings
        self.ledger = ledger
        self._settle = redis.register_script(_SETTLE)
        self._reschedule = redis.register_script(_RESCHEDULE)
        self._promote = redis.register_script(_PROMOTE)
        self._groups_ready = False

    async def ensure_groups(self) -> None:
        """Create each shard's stream and consumer group if missing (idempotent)."""
        if self._groups_ready:
            return
        async with store_errors("creating the outbox consumer group"):
            for shard in self.keys.all_shards():
                try:
                    await self._redis.xgroup_create(
                        shard.outbox, OUTBOX_GROUP, id="0", mkstream=True
                    )
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        self._groups_ready = True

    async def read(
        self, consumer: str, *, count: int, block_ms: int | None
    ) -> list[tuple[ShardKeys, str, str]]:
        """New entries for ``consumer``: (shard, entry id, payload)."""
        shards = {shard.outbox: shard for shard in self.keys.all_shards()}
        async with store_errors("reading the outbox"):
            reply = await self._redis.xreadgroup(
                OUTBOX_GROUP, consumer, dict.fromkeys(shards, ">"), count=count, block=block_ms
            )
        return [
            (shards[stream], entry_id, fields.get("entry", ""))
            for stream, entries in streams_reply(reply)
            for entry_id, fields in entries
        ]

    async def claim_stale(
        self, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[tuple[ShardKeys, str, str]]:
        """Take over entries another worker left pending for longer than ``min_idle_ms``."""
        claimed: list[tuple[ShardKeys, str, str]] = []
        async with store_errors("claiming stale outbox entries"):
            for shard in self.keys.all_shards():
                reply = await self._redis.xautoclaim(
                    shard.outbox, OUTBOX_GROUP, consumer, min_idle_ms, start_id="0-0", count=count
                )
                for entry_id, fields in stream_entries(reply[1] if len(reply) > 1 else []):
                    claimed.append((shard, entry_id, fields.get("entry", "")))
        return claimed

    async def promote_due(self, *, now: float, limit: int = 500) -> int:
        """Move retries whose backoff has passed back into their stream."""
        moved = 0
        async with store_errors("promoting due retries"):
            for shard in self.keys.all_shards():
                moved += as_int(
                    await self._promote(keys=[shard.retry, shard.outbox], args=[now, limit])
                )
        return moved

    async def settle(
        self,
        shard: ShardKeys,
        entry_id: str,
        update: LedgerUpdate,
        *,
        divergence: dict[str, str] | None = None,
        dead: dict[str, str] | None = None,
    ) -> bool:
        """Acknowledge an entry and apply its ledger update (and divergence, dead letter) atomically.

        Returns False, changing nothing, when the entry was no longer pending (another worker
        settled it).
        """
        args: list[str | int | float] = [
            OUTBOX_GROUP,
            entry_id,
            update.index_member,
            update.index_score,
            self.ledger.divergence_maxlen,
            DEAD_MAXLEN,
            *update.script_args(),
        ]
        for extra in (divergence or {}, dead or {}):
            args.append(len(extra))
            for name, value in extra.items():
                args += [name, value]
        keys = [shard.outbox, update.key, shard.ledger_index, shard.divergence, shard.dead]
        async with store_errors("settling an outbox entry"):
            return as_int(await self._settle(keys=keys, args=args)) == 1

    async def reschedule(
        self, shard: ShardKeys, entry_id: str, entry: OutboxEntry, *, due: float
    ) -> bool:
        """Acknowledge an entry and park it until ``due`` (False if it was no longer pending)."""
        async with store_errors("rescheduling an outbox entry"):
            done = await self._reschedule(
                keys=[shard.outbox, shard.retry],
                args=[OUTBOX_GROUP, entry_id, due, entry.payload()],
            )
        return as_int(done) == 1

    async def dead_letter_raw(
        self, shard: ShardKeys, entry_id: str, payload: str, *, reason: str, at: float
    ) -> None:
        """Move an entry that cannot even be parsed to the dead letters, as it was."""
        async with store_errors("dead-lettering an unreadable entry"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.xack(shard.outbox, OUTBOX_GROUP, entry_id)
            pipe.xdel(shard.outbox, entry_id)
            pipe.xadd(shard.dead, {"entry": payload, "reason": reason, "at": f"{at:.3f}"})
            await pipe.execute()

    async def depth(self) -> OutboxDepth:
        """Counts over all shards."""
        ready = pending = scheduled = dead = 0
        async with store_errors("measuring the outbox"):
            for shard in self.keys.all_shards():
                pipe = self._redis.pipeline(transaction=False)
                pipe.xlen(shard.outbox)
                pipe.zcard(shard.retry)
                pipe.xlen(shard.dead)
                lengths = await pipe.execute()
                ready += as_int(lengths[0])
                scheduled += as_int(lengths[1])
                dead += as_int(lengths[2])
                if lengths[0]:
                    try:
                        info = await self._redis.xpending(shard.outbox, OUTBOX_GROUP)
                        pending += as_int(info.get("pending") if isinstance(info, dict) else 0)
                    except ResponseError:
                        pass  # no group yet: nothing can be pending
        return OutboxDepth(ready=ready, pending=pending, scheduled=scheduled, dead=dead)


Disposition = Literal["accepted", "retry", "dead", "skipped"]


class OutboxWorker:
    """Delivers outbox entries to Stripe: one instance per process (inside the ASGI lifespan, or a
    ``dualwrite worker``), any number sharing one Redis."""

    def __init__(
        self,
        outbox: Outbox,
        writer: StripeWriter,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_wait: float = 30.0,
    ):
        self.outbox = outbox
        self.max_wait = max_wait
        self.writer = writer
        self.settings = outbox.settings
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._clock = clock
        self._rng = rng or random.Random()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_claim = 0.0
        self._inflight: set[asyncio.Task[None]] = set()
        self.counts: dict[Disposition, int] = {"accepted": 0, "retry": 0, "dead": 0, "skipped": 0}

    async def start(self) -> None:
        """Run the delivery loop in a background task."""
        await self.outbox.ensure_groups()
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"dualwrite-outbox-{self.consumer}")

    async def aclose(self, *, grace: float = 10.0) -> None:
        """Stop taking entries and let the deliveries in flight finish (waiting up to ``grace``
        seconds); what is left unsettled stays pending, and another worker claims it."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    await self._fill(block_ms=None if self._inflight else self.settings.block_ms)
                    failures = 0
                except StoreUnavailableError as exc:
                    failures += 1
                    if failures == 1 or failures % 50 == 0:  # an outage must not flood the log
                        log.warning("outbox worker paused: %s (%d round(s) so far)", exc, failures)
                except Exception:
                    failures += 1
                    log.exception("outbox worker round failed")
                if self._inflight:
                    # Read more as soon as any delivery frees a slot: a slow call to Stripe never
                    # holds up the others.
                    await asyncio.wait(self._inflight, timeout=0.05, return_when=FIRST_COMPLETED)
                elif failures:
                    delay = min(5.0, 0.05 * 2 ** min(failures, 10))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _fill(self, *, block_ms: int | None) -> int:
        """Promote due retries, claim stale entries, and start deliveries for free slots."""
        free = self.settings.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        await self.outbox.ensure_groups()
        now = self._clock()
        await self.outbox.promote_due(now=now)
        batch: list[tuple[ShardKeys, str, str]] = []
        if now - self._last_claim >= self.settings.claim_idle_seconds / 2:
            self._last_claim = now
            batch += await self.outbox.claim_stale(
                self.consumer,
                min_idle_ms=int(self.settings.claim_idle_seconds * 1000),
                count=min(free, self.settings.batch_size),
            )
        if not batch:
            batch = await self.outbox.read(
                self.consumer, count=min(free, self.settings.batch_size), block_ms=block_ms
            )
        for shard, entry_id, payload in batch:
            task = asyncio.create_task(self._deliver_logged(shard, entry_id, payload))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return len(batch)

    async def run_once(self, *, block_ms: int | None = None) -> int:
        """One round: promote due retries, claim stale entries, read new ones, deliver them all.

        Returns how many entries were handled.
        """
        handled = await self._fill(block_ms=block_ms)
        if self._inflight:
            await asyncio.gather(*self._inflight)
        return handled

    async def drain(self) -> None:
        """Deliver until nothing is outstanding, retries included (tests, the demo, shutdown).

        Bound it with ``anyio.fail_after`` or ``asyncio.timeout``: a shadow leg that keeps failing
        retryably keeps it waiting until ``max_age_seconds``.
        """
        while True:
            await self._fill(block_ms=None)
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=0.05, return_when=FIRST_COMPLETED)
                continue
            if (await self.outbox.depth()).outstanding == 0:
                return
            await asyncio.sleep(0.02)

    async def _deliver_logged(self, shard: ShardKeys, entry_id: str, payload: str) -> None:
        try:
            disposition = await self.deliver(shard, entry_id, payload)
        except Exception:
            # Left pending: another round (or another worker) claims it after the idle time.
            log.exception("delivering outbox entry %s failed; it stays pending", entry_id)
            return
        self.counts[disposition] += 1

    async def deliver(self, shard: ShardKeys, entry_id: str, payload: str) -> Disposition:
        """Write one entry to Stripe and settle it."""
        try:
            entry = OutboxEntry.parse(payload)
        except ValueError:
            log.error("outbox entry %s is unreadable; dead-lettering it", entry_id)
            return await self._dead_unreadable(shard, entry_id, payload)
        result = await self.writer.write(
            entry.leg, entry.event, value=entry.value, max_wait=self.max_wait
        )
        update = LedgerUpdate(shard, entry.event)
        if result.accepted:
            update.shadow_accepted(entry.leg, entry.value)
            done = await self.outbox.settle(shard, entry_id, update)
            return "accepted" if done else "skipped"
        failure = result.failure
        age = self._clock() - entry.enqueued_at
        if failure is not None and failure.retryable and age < self.settings.max_age_seconds:
            delay = self._backoff(entry.attempt, failure.retry_after)
            retry = entry.model_copy(
                update={"attempt": entry.attempt + 1, "last_error": describe_failure(failure)}
            )
            done = await self.outbox.reschedule(shard, entry_id, retry, due=self._clock() + delay)
            return "retry" if done else "skipped"
        return await self._dead(
            shard, entry_id, entry, result, expired=failure is not None and failure.retryable
        )

    async def _dead(
        self,
        shard: ShardKeys,
        entry_id: str,
        entry: OutboxEntry,
        result: WriteResult,
        *,
        expired: bool,
    ) -> Disposition:
        message = (result.failure.message if result.failure else "") or ""
        retired = entry.leg is Leg.LEGACY and RETIRED_LEGACY_MARKER in message
        update = LedgerUpdate(shard, entry.event).shadow_failed(
            entry.leg, entry.value, retired=retired
        )
        divergence = None
        if not retired:
            shadow_view = LegView.of(result)
            if expired:
                shadow_view = shadow_view.model_copy(update={"status": "expired"})
            authoritative_view = LegView(status="accepted", stripe_id=entry.authoritative_id)
            legacy, meter = (
                (shadow_view, authoritative_view)
                if entry.leg is Leg.LEGACY
                else (authoritative_view, shadow_view)
            )
            divergence = divergence_fields(
                entry.event,
                kind="shadow_expired" if expired else "shadow_refused",
                stage=entry.stage,
                legacy=legacy,
                meter=meter,
                note=f"after {entry.attempt + 1} attempt(s)",
                at=self._clock(),
            )
        dead = {
            "entry": entry.payload(),
            "reason": "expired" if expired else ("retired" if retired else "refused"),
            "error": describe_failure(result.failure) or "",
            "at": f"{self._clock():.3f}",
        }
        done = await self.outbox.settle(shard, entry_id, update, divergence=divergence, dead=dead)
        return "dead" if done else "skipped"

    async def _dead_unreadable(self, shard: ShardKeys, entry_id: str, payload: str) -> Disposition:
        await self.outbox.dead_letter_raw(
            shard, entry_id, payload, reason="unreadable", at=self._clock()
        )
        return "dead"

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.settings.backoff_max, self.settings.backoff_base * 2**attempt)
        delay = self._rng.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)
