"""Caller-side idempotency: the same identifier recorded twice gives the same outcome, written once.

Only events whose identifier came from the caller (an ``Idempotency-Key`` or a configured field) get a
record: a minted identifier is unique by construction, so nothing can replay it. A record is claimed
(``inflight``, with a lease) before the authoritative write, and completed with the outcome in the same
transaction that updates the ledger and enqueues the shadow.

The record keeps the event as first intercepted. A retry (after a failure, or after its holder died
and the lease ran out) is written with that stored event, so it carries the first attempt's "now"
and sends Stripe exactly the parameters of the first attempt: Stripe's own idempotency on the derived
per-leg keys then replays whatever an earlier attempt had already written.

This module also keeps the last quantity ``set`` at each (subscription item, timestamp), so that a
legacy ``set`` can be translated into the difference a ``sum`` meter needs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from dualwrite.keys import ShardKeys
from dualwrite.models import RecordOutcome, UsageEvent
from dualwrite.redis_client import as_int, as_str, store_errors

__all__ = ["SET_VALUE_TTL_SECONDS", "Claim", "IdempotencyStore"]

#: How long the last ``set`` value at a timestamp is remembered: longer than any billing period's
#: window for late usage (Stripe accepts meter events 35 days back).
SET_VALUE_TTL_SECONDS = 40 * 86400

# KEYS: idempotency record, set-value key
# ARGV: fingerprint, now, lease, ttl, read set value (1/0), event JSON, claim token
# The claim token makes the script safe to run twice: redis-py resends a command whose reply was
# lost (a timeout, a failover), and the second run must find its own claim, not a busy one.
_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'fp', 'state', 'lease', 'outcome', 'event', 'owner')
local prev = ''
if ARGV[5] == '1' then prev = redis.call('GET', KEYS[2]) or '' end
local lease = tonumber(ARGV[2]) + tonumber(ARGV[3])
if rec[1] then
  if rec[1] ~= ARGV[1] then return {'mismatch', '', ''} end
  if rec[2] == 'done' then return {'done', rec[4] or '', ''} end
  if rec[2] == 'inflight' and rec[6] == ARGV[7] then return {'new', prev, rec[5] or ''} end
  if rec[2] == 'inflight' and tonumber(rec[3] or '0') > tonumber(ARGV[2]) then
    return {'busy', '', ''}
  end
  redis.call('HSET', KEYS[1], 'state', 'inflight', 'lease', lease, 'owner', ARGV[7])
  return {'new', prev, rec[5] or ''}
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'inflight', 'lease', lease, 'event', ARGV[6],
  'owner', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'new', prev, ''}
"""

# Reopen a claim after a failed write: the stored event stays, for the caller's retry.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'state') == 'inflight' then
  return redis.call('HSET', KEYS[1], 'state', 'open', 'lease', 0)
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """The result of claiming an identifier."""

    state: Literal["new", "done", "busy", "mismatch", "untracked"]
    previous_set: int = 0
    """The quantity last ``set`` at the event's item and timestamp (0 if none)."""
    outcome: RecordOutcome | None = None
    """The stored outcome when ``state == "done"``."""
    event: UsageEvent | None = None
    """The event as first intercepted, when an earlier attempt with this identifier failed or died:
    the retry must write it, not the new intercept (whose "now" differs)."""


class IdempotencyStore:
    """Identifier records and ``set`` values in Redis."""

    def __init__(self, redis: aioredis.Redis, *, ttl_seconds: int, lease_seconds: int):
        self._redis = redis
        self.ttl_seconds = ttl_seconds
        self.lease_seconds = lease_seconds
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, shard: ShardKeys, event: UsageEvent, *, now: float) -> Claim:
        """Claim ``event``'s identifier, or report why not (already done, in flight, different usage).

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        wants_set = event.action == "set" and event.subscription_item is not None
        set_key = shard.set_value(event.subscription_item or "", event.timestamp)
        if event.identifier_source == "minted":
            previous = 0
            if wants_set:
                async with store_errors("reading the last set value"):
                    previous = as_int(await self._redis.get(set_key))
            return Claim("untracked", previous_set=previous)
        args: list[str | float] = [
            event.fingerprint(),
            now,
            self.lease_seconds,
            self.ttl_seconds,
            "1" if wants_set else "0",
            event.model_dump_json(),
            uuid.uuid4().hex,
        ]
        async with store_errors("claiming an identifier"):
            state, value, stored = await self._claim(
                keys=[shard.idempotency(event.identifier), set_key], args=args
            )
        state, value, stored = as_str(state) or "", as_str(value) or "", as_str(stored) or ""
        if state == "done":
            return Claim("done", outcome=RecordOutcome.model_validate_json(value))
        if state == "busy":
            return Claim("busy")
        if state == "mismatch":
            return Claim("mismatch")
        first = UsageEvent.model_validate_json(stored) if stored else None
        return Claim("new", previous_set=int(value) if value else 0, event=first)

    async def release(self, shard: ShardKeys, event: UsageEvent) -> None:
        """Reopen a claim after the authoritative write failed, so that a retry can try again (with
        the stored event)."""
        if event.identifier_source == "minted":
            return
        async with store_errors("releasing an identifier"):
            await self._release(keys=[shard.idempotency(event.identifier)])
