"""Claims: every event is held in Redis, with the plan it was first intercepted with, from before
its first write until it is committed.

A claim is made for every event, before the authoritative write: its record holds the event as
first intercepted (so a retry carries the first attempt's "now" and sends Stripe the same
parameters), its plan (``EventPlan``: which leg is authoritative, which is the shadow, under which
Stripe keys), a lease, and, once committed, the outcome. Each unresolved claim is also in the
shard's claims index, scored by when it is due for recovery:

* an event whose holder died between the authoritative write and the commit is due once its lease
  runs out; an event whose authoritative write got no answer (a timeout, a dropped connection) is
  due a lease after that. The workers re-drive both (``dualwrite.recovery``): the authoritative
  write is replayed under the same key, so Stripe answers with the original result, and the event
  is committed with its shadow, whether or not the caller ever retries;
* a caller's retry with the same identifier takes the claim over the same way, with the plan and
  the event of the first intercept, whatever the customer's stage has become.

A committed claim keeps its outcome for the caller's retries (``idempotency_ttl_seconds``) when
the identifier is the caller's; a minted one (no caller can retry it) is dropped at commit, so an
event without a caller's identifier leaves nothing behind.

This module also keeps, per (subscription item, timestamp), the quantity last ``set`` there and
the order of the sets, so that a legacy ``set`` becomes the difference a ``sum`` meter needs: the
previous value is read and replaced in the claim itself (one set at a time per item and timestamp:
a second one waits for the first to be committed or refused), and ``SetOrder`` writes a ``set``'s
legacy leg only if no later set was committed since (a later set supersedes an undelivered one).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from dualwrite import _remembered as remembered
from dualwrite.keys import ShardKeys, claim_digest
from dualwrite.models import EventPlan, RecordOutcome, UsageEvent
from dualwrite.redis_client import as_str, as_str_list, store_errors

if TYPE_CHECKING:
    from dualwrite.rate_limits import TokenAsk

__all__ = [
    "SET_VALUE_TTL_SECONDS",
    "Claim",
    "IdempotencyStore",
    "SetOrder",
    "SetTurn",
    "claim_member",
]

#: How long the last ``set`` value at a timestamp is remembered: longer than any billing period's
#: window for late usage (Stripe accepts meter events 35 days back).
SET_VALUE_TTL_SECONDS = 40 * 86400

# The set hash: a value kept as a plain string before the hash existed is converted in place.
# Returns nil when another event's set at this item and timestamp is still unresolved, else the
# set's position and the value it replaces (a retry of our own unresolved set gets its own back).
# KEYS[1] record, KEYS[2] set hash; ARGV[5] the quantity set, ARGV[10] the set hash's TTL.
_SET_TURN = """
local function set_turn()
  if redis.call('TYPE', KEYS[2])['ok'] == 'string' then
    local old = redis.call('GET', KEYS[2])
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[2], 'value', old)
  end
  local holder = redis.call('HGET', KEYS[2], 'holder')
  if holder == KEYS[1] then
    return {redis.call('HGET', KEYS[1], 'set_seq') or '', redis.call('HGET', KEYS[1], 'set_prev') or '0'}
  end
  if holder and redis.call('TYPE', holder)['ok'] == 'hash' then
    local state = redis.call('HGET', holder, 'state')
    if state == 'inflight' or state == 'open' then return nil end
  end
  local prev = redis.call('HGET', KEYS[2], 'value') or '0'
  local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
  redis.call('HSET', KEYS[2], 'value', ARGV[5], 'holder', KEYS[1])
  redis.call('EXPIRE', KEYS[2], ARGV[10])
  redis.call('HSET', KEYS[1], 'set_seq', seq, 'set_prev', prev)
  return {tostring(seq), prev}
end
"""

# KEYS: record, set hash, claims index
# ARGV: fingerprint, now, lease, ttl, set quantity ('' not a set), event JSON, claim token,
#       plan JSON, index member, set TTL
# The token makes the script safe to run twice: redis-py resends a command whose reply was lost
# (a timeout, a failover), and the second run must find its own claim, not a busy one.
_CLAIM = (
    _SET_TURN
    + """
-- A committed record is a string (dualwrite._remembered): the caller's code compares its digest.
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then return {'done', redis.call('GET', KEYS[1])} end
local rec = redis.call('HMGET', KEYS[1], 'fp', 'state', 'lease', 'outcome', 'event', 'owner', 'plan')
local lease = tonumber(ARGV[2]) + tonumber(ARGV[3])
local turn = {'', '0'}
if rec[1] then
  if rec[1] ~= ARGV[1] then return {'mismatch'} end
  if rec[2] == 'done' then return {'done', rec[4] or ''} end
  if rec[2] == 'inflight' and rec[6] ~= ARGV[7] and tonumber(rec[3] or '0') > tonumber(ARGV[2]) then
    return {'busy'}
  end
  if ARGV[5] ~= '' then
    turn = set_turn()
    if not turn then return {'set_busy'} end
  end
  if not rec[7] then
    rec[7] = ARGV[8]
    redis.call('HSET', KEYS[1], 'plan', rec[7])
  end
  redis.call('HSET', KEYS[1], 'state', 'inflight', 'lease', lease, 'owner', ARGV[7])
  redis.call('ZADD', KEYS[3], lease, ARGV[9])
  return {'new', rec[5] or '', rec[7], turn[1], turn[2]}
end
if ARGV[5] ~= '' then
  turn = set_turn()
  if not turn then return {'set_busy'} end
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'inflight', 'lease', lease, 'event', ARGV[6],
  'owner', ARGV[7], 'plan', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], lease, ARGV[9])
return {'new', '', ARGV[8], turn[1], turn[2]}
"""
)

# After a refused authoritative write. In doubt (no answer: it may have been written), the claim
# stays due for recovery a lease from now. Refused for sure, it leaves the index, a set's value and
# position are put back, and a minted claim (nobody can retry it) is dropped; a caller's stays
# open, holding the event, for its retry.
# KEYS: record, set hash, claims index; ARGV: in doubt (1/0), due, member, minted (1/0), token
_RELEASE = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
local rec = redis.call('HMGET', KEYS[1], 'state', 'owner', 'set_prev')
if rec[1] ~= 'inflight' or rec[2] ~= ARGV[5] then return 0 end
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'open', 'lease', 0)
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
  return 1
end
if redis.call('HGET', KEYS[2], 'holder') == KEYS[1] then
  redis.call('HSET', KEYS[2], 'value', rec[3] or '0')
  redis.call('HINCRBY', KEYS[2], 'seq', -1)
  redis.call('HDEL', KEYS[2], 'holder')
  if redis.call('HGET', KEYS[2], 'sending') == KEYS[1] then
    redis.call('HDEL', KEYS[2], 'sending', 'sending_until')
  end
end
redis.call('ZREM', KEYS[3], ARGV[3])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'state', 'open', 'lease', 0)
  redis.call('HDEL', KEYS[1], 'set_seq', 'set_prev')
end
return 1
"""

# Recovery takes over a claim that is due: an expired lease, or an answer that never came.
# KEYS: record, claims index; ARGV: now, lease, token, member
_TAKE = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then
  redis.call('ZREM', KEYS[2], ARGV[4])
  return {'gone'}
end
local rec = redis.call('HMGET', KEYS[1], 'state', 'lease', 'event', 'plan', 'set_seq', 'set_prev')
if not rec[1] or rec[1] == 'done' or not rec[3] or not rec[4] then
  redis.call('ZREM', KEYS[2], ARGV[4])
  return {'gone'}
end
if rec[1] == 'inflight' and tonumber(rec[2] or '0') > tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[2], rec[2], ARGV[4])
  return {'busy'}
end
if rec[1] == 'open' then
  local due = redis.call('ZSCORE', KEYS[2], ARGV[4])
  if not due then return {'gone'} end
  if tonumber(due) > tonumber(ARGV[1]) then return {'busy'} end
end
local lease = tonumber(ARGV[1]) + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'inflight', 'lease', lease, 'owner', ARGV[3])
redis.call('ZADD', KEYS[2], lease, ARGV[4])
return {'taken', rec[3], rec[4], rec[5] or '', rec[6] or '0'}
"""

# A set's legacy write: 'superseded' when a later set at the item and timestamp was committed;
# 'busy' while another holder's legacy write there is in flight; else 'go', holding the turn.
# KEYS: set hash; ARGV: the set's position, token, lease (ms)
# An old-format committed record (a hash holding the JSON outcome) rewritten in the compact form,
# its remaining time to live kept. KEYS: record; ARGV: the compact record, the full fingerprint.
_UPGRADE = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
local rec = redis.call('HMGET', KEYS[1], 'state', 'fp')
if rec[1] ~= 'done' or rec[2] ~= ARGV[2] then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

_SET_BEGIN = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 'go' end
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed') or '0')
if tonumber(ARGV[1]) < committed then return 'superseded' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = redis.call('HGET', KEYS[1], 'sending')
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'sending_until') or '0')
if holder and holder ~= ARGV[2] and until_ms > now then return 'busy' end
redis.call('HSET', KEYS[1], 'sending', ARGV[2], 'sending_until', now + tonumber(ARGV[3]))
return 'go'
"""

_SET_END = """
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' and redis.call('HGET', KEYS[1], 'sending') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'sending', 'sending_until')
end
return 0
"""


def claim_member(event: UsageEvent) -> str:
    """The event's entry in its shard's claims index: the record's digest, its customer and
    meter event name (what the report counts as pending)."""
    return f"{claim_digest(event.identifier)}|{event.customer}|{event.event_name}"


@dataclass(frozen=True, slots=True)
class Claim:
    """The result of claiming an event (or of taking one over for recovery)."""

    state: Literal["new", "done", "busy", "mismatch", "set_busy", "untracked"]
    plan: EventPlan | None = None
    """The plan of the first intercept (None when untracked: Redis was down)."""
    event: UsageEvent | None = None
    """The event as first intercepted, when an earlier attempt failed or died: the retry must
    write it, not the new intercept (whose "now" differs)."""
    outcome: RecordOutcome | None = None
    """The stored outcome when ``state == "done"``."""
    token: str = ""
    """This holder's token (releasing the claim needs it)."""
    set_seq: int | None = None
    """A ``set``'s position among the sets at its item and timestamp."""
    set_previous: int = 0
    """The quantity ``set`` before at the event's item and timestamp (0 if none)."""

    @property
    def held(self) -> bool:
        """Whether a claim record holds the event (it must then be committed or released)."""
        return self.state == "new"


class IdempotencyStore:
    """Claims, their index and ``set`` values in Redis."""

    def __init__(self, redis: aioredis.Redis, *, ttl_seconds: int, lease_seconds: int):
        self._redis = redis
        self.ttl_seconds = ttl_seconds
        self.lease_seconds = lease_seconds
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._take = redis.register_script(_TAKE)
        self._upgrade = redis.register_script(_UPGRADE)

    async def claim(
        self, shard: ShardKeys, event: UsageEvent, plan: EventPlan, *, now: float
    ) -> Claim:
        """Claim ``event`` with ``plan``, or report why not (already done, in flight, different
        usage, another set at its item and timestamp unresolved).

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        claim, _ = await self.claim_riding(shard, event, plan, now=now, ride=None)
        return claim

    async def claim_riding(
        self,
        shard: ShardKeys,
        event: UsageEvent,
        plan: EventPlan,
        *,
        now: float,
        ride: TokenAsk | None,
    ) -> tuple[Claim, object]:
        """``claim``, with another script call (``ride``: the legacy rate-limit token, on a key
        of its own) sent in the same round trip; returns the claim and the ride's reply (or the
        error it raised; None without a ride). The two run one after the other in Redis, not
        atomically: a ride whose claim turns out not to be new is the caller's to undo. Not for
        a Redis Cluster client (the keys are in different slots).

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        wants_set = event.action == "set" and event.subscription_item is not None
        token = uuid.uuid4().hex
        plan_json = plan.model_dump_json()
        args: list[str | float] = [
            event.fingerprint(),
            now,
            self.lease_seconds,
            self.ttl_seconds,
            str(event.quantity) if wants_set else "",
            event.model_dump_json(),
            token,
            plan_json,
            claim_member(event),
            SET_VALUE_TTL_SECONDS,
        ]
        keys = [shard.idempotency(event.identifier), _set_key(shard, event), shard.claims]
        ridden: object = None
        async with store_errors("claiming an event"):
            if ride is None:
                reply = as_str_list(await self._claim(keys=keys, args=args))
            else:
                # EVALSHA by hand: a pipeline holding Script objects asks SCRIPT EXISTS each time.
                pipe = self._redis.pipeline(transaction=False)
                pipe.execute_command("EVALSHA", self._claim.sha, len(keys), *keys, *args)
                pipe.execute_command(
                    "EVALSHA", ride.script.sha, len(ride.keys), *ride.keys, *ride.args
                )
                first, ridden = await pipe.execute(raise_on_error=False)
                if isinstance(first, NoScriptError):  # not run: Redis restarted or was flushed
                    first = await self._claim(keys=keys, args=args)
                elif isinstance(first, Exception):
                    raise first
                reply = as_str_list(first)
        state = reply[0]
        if state == "done":
            return await self._remembered(keys[0], event, reply[1]), ridden
        if state in ("busy", "mismatch", "set_busy"):
            return Claim(state), ridden  # type: ignore[arg-type]  # one of the literals, checked here
        return _held(token, *reply[1:], sent=(plan_json, plan)), ridden

    async def _remembered(self, key: str, event: UsageEvent, record: str) -> Claim:
        """The claim of an event committed before: its outcome rebuilt for ``event`` (a retry),
        or a mismatch when the identifier was first used for other usage. A record in the old
        format (the whole outcome as JSON) is rewritten in the compact one."""
        if not remembered.matches(record, event):
            return Claim("mismatch")
        outcome = remembered.decode(record, event)
        if remembered.is_legacy_json(record):
            async with store_errors("upgrading an idempotency record"):
                await self._upgrade(
                    keys=[key], args=[remembered.encode(outcome), event.fingerprint()]
                )
        return Claim("done", outcome=outcome)

    async def release(
        self, shard: ShardKeys, event: UsageEvent, claim: Claim, *, in_doubt: bool, now: float
    ) -> None:
        """Let go of a claim whose authoritative write was refused: kept due for recovery when
        the outcome is in doubt (no answer came), else reopened for the caller's retry (a minted
        one is dropped) with a ``set``'s value put back."""
        if not claim.held:
            return
        args: list[str | float] = [
            "1" if in_doubt else "0",
            now + self.lease_seconds,
            claim_member(event),
            "1" if event.identifier_source == "minted" else "0",
            claim.token,
        ]
        keys = [shard.idempotency(event.identifier), _set_key(shard, event), shard.claims]
        async with store_errors("releasing a claim"):
            await self._release(keys=keys, args=args)

    async def due(self, shard: ShardKeys, *, now: float, limit: int) -> list[str]:
        """Members of the claims index due for recovery now (oldest first)."""
        async with store_errors("reading the claims due"):
            found = await self._redis.zrangebyscore(shard.claims, "-inf", now, start=0, num=limit)
        return as_str_list(found)

    async def take(self, shard: ShardKeys, member: str, *, now: float) -> Claim | None:
        """Take over a claim due for recovery (None: resolved meanwhile, or not due after all).

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        token = uuid.uuid4().hex
        digest = member.split("|", 1)[0]
        keys = [shard.claim_record(digest), shard.claims]
        async with store_errors("taking over a claim"):
            reply = as_str_list(
                await self._take(keys=keys, args=[now, self.lease_seconds, token, member])
            )
        if reply[0] != "taken":
            return None
        return _held(token, *reply[1:])

    async def unresolved(self, shard: ShardKeys) -> list[str]:
        """Every member of the shard's claims index (events claimed and not yet committed)."""
        async with store_errors("reading the claims index"):
            return as_str_list(await self._redis.zrange(shard.claims, 0, -1))


def _held(
    token: str,
    event: str,
    plan: str,
    seq: str,
    previous: str,
    *,
    sent: tuple[str, EventPlan] | None = None,
) -> Claim:
    """A claim now held; ``sent`` is the plan the claim was made with (JSON, object): when the
    claim kept it (a first intercept), it is not parsed again."""
    return Claim(
        "new",
        plan=sent[1]
        if sent is not None and sent[0] == plan
        else EventPlan.model_validate_json(plan),
        event=UsageEvent.model_validate_json(event) if event else None,
        token=token,
        set_seq=int(seq) if seq else None,
        set_previous=int(previous or "0"),
    )


def _set_key(shard: ShardKeys, event: UsageEvent) -> str:
    return shard.set_value(event.subscription_item or "-", event.timestamp)


SetTurn = Literal["go", "superseded", "busy"]
"""Whether a ``set``'s legacy write may go now, is superseded by a later committed set, or must
wait for another legacy write at the same item and timestamp."""


class SetOrder:
    """Orders the legacy writes of ``set`` usage at one item and timestamp: one in flight at a
    time, and never one older than the last set committed there (Stripe keeps the last value
    written, so an earlier set delivered late would overwrite a later one)."""

    def __init__(self, redis: aioredis.Redis, *, lease_seconds: float):
        self._lease_ms = int(lease_seconds * 1000)
        self._begin = redis.register_script(_SET_BEGIN)
        self._end = redis.register_script(_SET_END)

    async def begin(self, shard: ShardKeys, event: UsageEvent, seq: int, token: str) -> SetTurn:
        """Ask to write the legacy leg of the ``set`` at position ``seq``.

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        async with store_errors("ordering a set"):
            verdict = as_str(
                await self._begin(keys=[_set_key(shard, event)], args=[seq, token, self._lease_ms])
            )
        if verdict == "superseded":
            return "superseded"
        return "busy" if verdict == "busy" else "go"

    async def end(self, shard: ShardKeys, event: UsageEvent, token: str) -> None:
        """Give the turn back (its lease would run out anyway).

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        async with store_errors("ordering a set"):
            await self._end(keys=[_set_key(shard, event)], args=[token])
