"""The Redis side of recording one accepted event, as a value: applied atomically, or spooled.

After Stripe accepted the authoritative write, the engine must, together: update the ledger, enqueue
the shadow write, log a translation as divergence, and resolve the event's claim (keep the outcome
for the caller's retries, or drop a minted claim; leave the claims index; for a ``set``, give its
turn back and mark it the last committed). A ``Commit`` holds all of that; ``CommitWriter.apply``
runs it as one Lua script in the customer's shard, and only while the claim is unresolved, so a
recovery and a late holder never both count the event. When Redis cannot be reached, the same value
goes to the local spool (``dualwrite.spool``) and is applied later, exactly once.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from dualwrite.keys import ShardKeys
from dualwrite.ledger._update import LedgerUpdate, ledger_block, ledger_script
from dualwrite.redis_client import as_int, store_errors

__all__ = ["IN_DOUBT_MARKER_TTL", "SPOOL_MARKER_TTL", "Commit", "CommitWriter"]

#: How long a replayed spool commit is remembered, so that a replay interrupted and run again cannot
#: apply it twice.
SPOOL_MARKER_TTL = 30 * 86400

#: How long a commit applied on the request path is remembered when no caller identifier records it.
#: When Redis applied the script but the reply was lost (a timeout, a dropped connection), redis-py
#: sends it again and the engine may spool it: the marker makes both a no-op. Ten minutes covers
#: the client's retry and a spool replay after a short outage, at one small key per event.
IN_DOUBT_MARKER_TTL = 600

# KEYS and ARGV: the ledger block (``dualwrite.ledger._update``: the increments and the translation's
# divergence entry), then
# own KEYS: outbox, claim record, set value, spool marker, claims index
# own ARGV: marker ttl (0: none), idempotency ttl, set value ('' none), set ttl, remembered record
#       ('' none), outbox payload ('' none), claimed (1/0), claims index member, drop the claim
#       (1/0), set position ('' none)
_APPLY = ledger_script(
    """
local outbox, claim, set_key, marker, claims = unpack(KEYS, OWN_KEYS)
local marker_ttl, ttl, set_value, set_ttl, remembered, payload, claimed, member, drop, set_seq =
  unpack(ARGV, OWN_ARGS)
-- A committed record is a string (the compact outcome), or a hash in state 'done' (older format).
local kind = redis.call('TYPE', claim)['ok']
local committed = kind == 'string' or (kind == 'hash' and redis.call('HGET', claim, 'state') == 'done')
if claimed == '1' then
  -- The claim is held: the commit applies only while it is unresolved. A recovery or a caller's
  -- retry that committed first makes this one a no-op (a minted claim is gone once committed).
  if kind ~= 'hash' or committed then return 0 end
elseif remembered ~= '' and committed then
  -- A caller's retry may have recorded this identifier while the commit waited in the spool (its
  -- first attempt found Redis down, so nothing claimed it): count it once.
  return 0
end
if marker_ttl ~= '0' then
  if not redis.call('SET', marker, '1', 'NX', 'EX', marker_ttl) then return 0 end
end
ledger_update()
if payload ~= '' then redis.call('XADD', outbox, '*', 'entry', payload) end
if set_value ~= '' then
  -- A set recorded without a claim (Redis was down then): its value, for the next one.
  if redis.call('TYPE', set_key)['ok'] == 'string' then redis.call('DEL', set_key) end
  redis.call('HSET', set_key, 'value', set_value)
  redis.call('EXPIRE', set_key, set_ttl)
end
if claimed == '1' then
  redis.call('ZREM', claims, member)
  if set_seq ~= '' and redis.call('TYPE', set_key)['ok'] == 'hash' then
    if redis.call('HGET', set_key, 'holder') == claim then redis.call('HDEL', set_key, 'holder') end
    if redis.call('HGET', set_key, 'sending') == claim then
      redis.call('HDEL', set_key, 'sending', 'sending_until')
    end
    if tonumber(set_seq) > tonumber(redis.call('HGET', set_key, 'committed') or '0') then
      redis.call('HSET', set_key, 'committed', set_seq)
    end
  end
end
if remembered ~= '' then
  -- Kept for the caller's retries, in place of the claim: the usage's digest and the compact
  -- outcome (dualwrite._remembered), one string.
  redis.call('SET', claim, remembered, 'EX', ttl)
elseif drop == '1' then
  redis.call('DEL', claim)
end
return 1
"""
)


class Commit(BaseModel):
    """Everything Redis must record, atomically, once Stripe accepted an authoritative write."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    prefix: str
    shard: int
    ledger_key: str
    index_member: str
    index_score: int
    increments: dict[str, int]
    outbox_payload: str | None = None
    divergence: dict[str, str] | None = None
    idempotency_key: str | None = None
    outcome_json: str | None = None
    """The record kept for the caller's retries (``dualwrite._remembered``; a commit spooled by an
    older version holds the whole outcome as JSON, which reads too)."""
    idempotency_ttl: int = 0
    set_key: str | None = None
    set_value: int | None = None
    """The quantity of a ``set`` recorded without a claim (Redis was down then); a claimed set's
    value was replaced in its claim."""
    set_ttl: int = 0
    claimed: bool = False
    """A claim record (``idempotency_key``) holds the event: the commit resolves it, and applies
    only while it is unresolved."""
    claim_member: str | None = None
    drop_claim: bool = False
    """Delete the claim record once committed (a minted identifier: nobody can retry it)."""
    set_seq: int | None = None
    """A claimed ``set``'s position at its item and timestamp (it becomes the last committed)."""

    @classmethod
    def of_update(cls, update: LedgerUpdate, **fields: Any) -> Commit:
        """The commit of ``update``'s ledger counts, in its shard, with ``fields`` besides (the
        shadow's outbox payload, a divergence entry, the idempotency record, a ``set`` value)."""
        return cls(
            prefix=update.keys.prefix,
            shard=update.keys.shard,
            ledger_key=update.key,
            index_member=update.index_member,
            index_score=update.index_score,
            increments=update.increments,
            **fields,
        )

    @property
    def keys(self) -> ShardKeys:
        """The shard the commit lives in."""
        return ShardKeys(self.prefix, self.shard)

    def with_increments(self, extra: dict[str, int]) -> Commit:
        """The same commit, counting ``extra`` as well (a replay marks itself as delayed)."""
        merged = dict(self.increments)
        for name, amount in extra.items():
            merged[name] = merged.get(name, 0) + amount
        return self.model_copy(update={"increments": merged})


class CommitWriter:
    """Applies commits to Redis."""

    def __init__(self, redis: aioredis.Redis, *, divergence_maxlen: int):
        self._redis = redis
        self._divergence_maxlen = divergence_maxlen
        self._apply = redis.register_script(_APPLY)

    async def apply(self, commit: Commit, *, once: bool = False) -> bool:
        """Apply ``commit`` in one script; with ``once``, only if it was never applied before.

        Returns False when ``once`` found it already applied, or when the event is already
        recorded (a caller's retry or a recovery got there first). Applying the same commit again
        is always a no-op: a claimed event is guarded by its claim, an event recorded while Redis
        was down by its identifier's record or a marker kept ``IN_DOUBT_MARKER_TTL`` seconds
        (``once``: ``SPOOL_MARKER_TTL``).

        Raises:
            StoreUnavailableError: Redis could not be reached or did not answer; the commit may
                have been applied, and applying it again (or spooling it) is safe.
        """
        shard = commit.keys
        keys, args = ledger_block(
            shard,
            row=commit.ledger_key,
            member=commit.index_member,
            score=commit.index_score,
            increments=commit.increments,
            divergence=commit.divergence,
            divergence_maxlen=self._divergence_maxlen,
        )
        keys += [
            shard.outbox,
            commit.idempotency_key or shard.idempotency(commit.id),
            commit.set_key or shard.set_value("-", 0),
            f"{shard.tag}:spooled:{commit.id}",
            shard.claims,
        ]
        marker_ttl = (
            IN_DOUBT_MARKER_TTL if commit.outcome_json is None and not commit.claimed else 0
        )
        if once:
            marker_ttl = SPOOL_MARKER_TTL
        args += [
            marker_ttl,
            commit.idempotency_ttl,
            "" if commit.set_value is None else commit.set_value,
            commit.set_ttl,
            commit.outcome_json or "",
            commit.outbox_payload or "",
            "1" if commit.claimed else "0",
            commit.claim_member or "",
            "1" if commit.drop_claim else "0",
            "" if commit.set_seq is None else commit.set_seq,
        ]
        async with store_errors("committing a recorded event"):
            return as_int(await self._apply(keys=keys, args=args)) == 1
