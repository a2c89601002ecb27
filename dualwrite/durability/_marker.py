"""The data-loss markers in Redis: their scripts, the loss they record, reading and clearing it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from dualwrite.keys import KeySpace
from dualwrite.redis_client import as_str, store_errors

__all__ = [
    "CHECK_SCRIPT",
    "RECLEAR_HINT",
    "RECORD_SCRIPT",
    "DataLoss",
    "clear_loss",
    "earliest",
    "loss_of",
    "marker_keys",
    "read_loss",
    "utc",
]

#: What an operator does about a loss.
RECLEAR_HINT = (
    "run `dualwrite reconcile` for the periods since then (Stripe's totals name the customers "
    "whose usage the ledger lost), then `dualwrite durability --clear-loss`"
)
# KEYS: marker; ARGV: a new id, now. Creates the marker when missing, else counts a beat. Returns
# id, beat, created ('1' when just created), lost_since, lost_at ('' when unset).
CHECK_SCRIPT = """
local id = redis.call('HGET', KEYS[1], 'id')
if not id then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'created_at', ARGV[2], 'beat', 1)
  return {ARGV[1], '1', '1', '', ''}
end
local beat = redis.call('HINCRBY', KEYS[1], 'beat', 1)
local lost = redis.call('HMGET', KEYS[1], 'lost_since', 'lost_at')
return {id, tostring(beat), '0', lost[1] or '', lost[2] or ''}
"""

# KEYS: marker; ARGV: lost_since, lost_at. Keeps the earliest loss.
RECORD_SCRIPT = """
local since = redis.call('HGET', KEYS[1], 'lost_since')
if not since or tonumber(since) > tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'lost_since', ARGV[1], 'lost_at', ARGV[2])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class DataLoss:
    """A data loss recorded in the markers."""

    since: float
    """The earliest instant the loss can have started (Unix seconds): the ledger is incomplete
    from then on."""
    detected_at: float
    """When a process saw it."""

    def as_dict(self) -> dict[str, Any]:
        """For health and JSON: both instants (Unix and UTC) and what to do."""
        return {
            "since": self.since,
            "since_utc": utc(self.since),
            "detected_at": self.detected_at,
            "detected_at_utc": utc(self.detected_at),
            "action": RECLEAR_HINT,
        }


def utc(at: float) -> str:
    """``at`` (Unix seconds) as ISO 8601 UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def marker_keys(keys: KeySpace) -> list[str]:
    """Every marker: one per shard, and the flags' (each its own slot)."""
    return [shard.marker for shard in keys.all_shards()] + [keys.flags_marker]


def loss_of(fields: Sequence[str]) -> DataLoss | None:
    """The loss in a marker's ``lost_since``, ``lost_at`` fields (None: none recorded)."""
    since, at = (fields[0] if fields else ""), (fields[1] if len(fields) > 1 else "")
    if not since:
        return None
    return DataLoss(since=float(since), detected_at=float(at or since))


def earliest(*losses: DataLoss | None) -> DataLoss | None:
    """The loss that began first (None when there is none)."""
    found = [loss for loss in losses if loss is not None]
    return min(found, key=lambda loss: loss.since) if found else None


async def read_loss(redis: aioredis.Redis, keys: KeySpace) -> DataLoss | None:
    """The loss the markers record (the earliest over all of them), if any.

    Raises:
        StoreUnavailableError: Redis could not be reached.
    """
    found: DataLoss | None = None
    async with store_errors("reading the data-loss markers"):
        for key in marker_keys(keys):
            values = await redis.hmget(key, ["lost_since", "lost_at"])
            found = earliest(found, loss_of([str(as_str(value) or "") for value in values]))
    return found


async def clear_loss(redis: aioredis.Redis, keys: KeySpace) -> DataLoss | None:
    """Forget the recorded loss (after ``dualwrite reconcile``); returns what was cleared.

    Raises:
        StoreUnavailableError: Redis could not be reached.
    """
    cleared = await read_loss(redis, keys)
    async with store_errors("clearing the data-loss markers"):
        for key in marker_keys(keys):
            await redis.hdel(key, "lost_since", "lost_at")
    return cleared
