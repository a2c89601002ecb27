"""The outbox streams, their entries, and the atomic steps taken on them (Lua scripts)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from dualwrite.config import OutboxSettings
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.ledger import Ledger, LedgerUpdate, ledger_script
from dualwrite.models import Leg, Stage, UsageEvent
from dualwrite.rate_limits import MeterTurn
from dualwrite.redis_client import (
    as_int,
    as_str,
    is_cluster,
    read_groups,
    store_errors,
    stream_entries,
    streams_reply,
)

__all__ = ["DEAD_MAXLEN", "OUTBOX_GROUP", "RETIRED", "Outbox", "OutboxDepth", "OutboxEntry"]

log = logging.getLogger(__name__)

OUTBOX_GROUP = "dualwrite-workers"
DEAD_MAXLEN = 1_000_000
#: The reason of a retired write's dead letter (a legacy write Stripe refused because the item moved
#: to its meter-backed price): not a failure, so it goes to the shard's retired stream.
RETIRED = "retired"

_T = TypeVar("_T")

# KEYS and ARGV: the ledger block (``dualwrite.ledger``: the increments and the divergence entry),
# then own KEYS: outbox, dead letters (the retired stream for a retired write), [meter turn]; own
# ARGV: group, entry id, dead maxlen, turn token ('': no turn to release), then the dead letter as a
# count followed by name/value pairs.
# The meter turn is released first: also when the entry was settled already, as its holder is done.
_SETTLE = ledger_script(
    """
local outbox, dead, turn = unpack(KEYS, OWN_KEYS)
local group, entry_id, dead_maxlen, token, dead_n = unpack(ARGV, OWN_ARGS)
if token ~= '' and redis.call('GET', turn) == token then redis.call('DEL', turn) end
if redis.call('XACK', outbox, group, entry_id) == 0 then return 0 end
redis.call('XDEL', outbox, entry_id)
ledger_update()
if tonumber(dead_n) > 0 then
  local letter = {unpack(ARGV, OWN_ARGS + 5, OWN_ARGS + 4 + 2 * tonumber(dead_n))}
  redis.call('XADD', dead, 'MAXLEN', '~', dead_maxlen, '*', unpack(letter))
end
return 1
"""
)

# KEYS: dead letters, retired stream; ARGV: entry id, retired maxlen, then its fields and values
_MOVE_RETIRED = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return 1
"""
_MOVE_PAGE = 1_000
_MOVE_LEASE_SECONDS = 300

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
    period: str | None = None
    """The ledger period the event was recorded in (None: its UTC day)."""
    set_seq: int | None = None
    """A ``set``'s position among the sets at its item and timestamp (``SetOrder``)."""

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
    """Dead letters: writes refused for good or expired. Retired writes are not failures and are
    not counted (they live in their own stream)."""

    @property
    def outstanding(self) -> int:
        """Entries not yet settled."""
        return self.ready + self.scheduled


class _Coalesced:
    """Runs of one script asked for within one turn of the event loop go to Redis in one pipeline
    (deliveries finishing together settle together): each run stays atomic on its own, only the
    round trip and the client's per-command work are shared. A single run is sent as it is."""

    def __init__(self, redis: aioredis.Redis, script: AsyncScript):
        self._redis = redis
        self._script = script
        self._queue: list[tuple[list[str], list[str | int], asyncio.Future[object]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[str], args: list[str | int]) -> object:
        """The script's reply (or its error) for these keys and arguments."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, future))
        if len(self._queue) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, batch: list[tuple[list[str], list[str | int], asyncio.Future[object]]]
    ) -> None:
        replies: list[object]
        try:
            if len(batch) == 1:
                keys, args, _ = batch[0]
                replies = [await self._script(keys=keys, args=args)]
            else:
                # EVALSHA by hand: a pipeline holding Script objects asks SCRIPT EXISTS every time.
                pipe = self._redis.pipeline(transaction=False)
                for keys, args, _ in batch:
                    pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the same failure for every caller, raised where it waits
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (keys, args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted or flushed its scripts
                try:
                    reply = await self._script(keys=keys, args=args)
                except Exception as exc:
                    reply = exc
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


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
        # On a cluster the runs of one turn span slots and nodes: each goes on its own.
        self._settle_one = None if is_cluster(redis) else _Coalesced(redis, self._settle)
        self._reschedule = redis.register_script(_RESCHEDULE)
        self._promote = redis.register_script(_PROMOTE)
        self._move_retired = redis.register_script(_MOVE_RETIRED)
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
            await self._move_old_retired()
        self._groups_ready = True

    async def _move_old_retired(self) -> None:
        """Move the retired letters an older version wrote to the dead stream into the retired
        stream, so the dead count is failures only. Once per shard: a marker says it is done (and,
        with a lease, that a process is at it); each letter moves in one script, once."""
        for shard in self.keys.all_shards():
            if as_str(await self._redis.get(shard.retired_moved)) == "done":
                continue
            if not await self._redis.set(
                shard.retired_moved, "moving", nx=True, ex=_MOVE_LEASE_SECONDS
            ):
                continue  # another process is moving them
            start, moved = "-", 0
            while True:
                page = stream_entries(
                    await self._redis.xrange(shard.dead, min=start, count=_MOVE_PAGE)
                )
                for entry_id, fields in page:
                    if fields.get("reason") == RETIRED:
                        pairs = [part for pair in fields.items() for part in pair]
                        moved += as_int(
                            await self._move_retired(
                                keys=[shard.dead, shard.retired],
                                args=[entry_id, DEAD_MAXLEN, *pairs],
                            )
                        )
                if len(page) < _MOVE_PAGE:
                    break
                start = f"({page[-1][0]}"
            await self._redis.set(shard.retired_moved, "done")
            if moved:
                log.info(
                    "moved %d retired letter(s) of shard %d to their own stream", moved, shard.shard
                )

    async def _mending_groups(self, action: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``action``; if Redis answers NOGROUP (a stream and its group are gone: Redis lost
        its data, or was replaced by an empty one), create the groups again and run it once more.

        Acknowledgements need no mending: XACK on a missing group answers 0, which settles
        nothing (the entry went with the stream).
        """
        try:
            return await action()
        except StoreUnavailableError as exc:
            if "NOGROUP" not in str(exc):
                raise
        log.warning("the outbox consumer group is gone (Redis lost its data?): creating it again")
        self._groups_ready = False
        await self.ensure_groups()
        return await action()

    async def read(
        self, consumer: str, *, count: int, block_ms: int | None
    ) -> list[tuple[ShardKeys, str, str]]:
        """New entries for ``consumer``: (shard, entry id, payload)."""
        shards = {shard.outbox: shard for shard in self.keys.all_shards()}

        async def read() -> object:
            async with store_errors("reading the outbox"):
                return await read_groups(
                    self._redis,
                    OUTBOX_GROUP,
                    consumer,
                    dict.fromkeys(shards, ">"),
                    count=count,
                    block_ms=block_ms,
                )

        reply = await self._mending_groups(read)
        return [
            (shards[stream], entry_id, fields.get("entry", ""))
            for stream, entries in streams_reply(reply)
            for entry_id, fields in entries
        ]

    async def claim_stale(
        self, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[tuple[ShardKeys, str, str]]:
        """Take over entries another worker left pending for longer than ``min_idle_ms``."""

        async def claim() -> list[tuple[ShardKeys, str, str]]:
            claimed: list[tuple[ShardKeys, str, str]] = []
            async with store_errors("claiming stale outbox entries"):
                for shard in self.keys.all_shards():
                    reply = await self._redis.xautoclaim(
                        shard.outbox,
                        OUTBOX_GROUP,
                        consumer,
                        min_idle_ms,
                        start_id="0-0",
                        count=count,
                    )
                    for entry_id, fields in stream_entries(reply[1] if len(reply) > 1 else []):
                        claimed.append((shard, entry_id, fields.get("entry", "")))
            return claimed

        return await self._mending_groups(claim)

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
        turn: MeterTurn | None = None,
    ) -> bool:
        """Acknowledge an entry and apply its ledger update (and divergence, dead letter) atomically.

        ``turn``, a meter turn held for the entry's write, is released in the same script (and
        marked released) when its key is in ``shard``'s slot; else its holder releases it.

        Returns False, changing nothing else, when the entry was no longer pending (another worker
        settled it).
        """
        if turn is not None and not turn.key.startswith(shard.tag + ":"):
            turn = None  # another slot: a script cannot touch both on a cluster
        keys, args = self._settle_call(shard, entry_id, update, divergence, dead, turn)
        async with store_errors("settling an outbox entry"):
            if self._settle_one is None:
                done = as_int(await self._settle(keys=keys, args=args)) == 1
            else:
                done = as_int(await self._settle_one(keys, args)) == 1
        if turn is not None:
            turn.released = True
        return done

    async def settle_many(self, items: Sequence[tuple[ShardKeys, str, LedgerUpdate]]) -> list[bool]:
        """``settle`` for many entries in one round trip (a v2 stream batch): each entry's script
        is atomic on its own, exactly as ``settle``; only the round trips are shared.

        Returns, per entry, False when it was no longer pending.
        """
        if is_cluster(self._redis):  # entries of several slots: one call each, as ``settle``
            return [await self.settle(shard, entry_id, update) for shard, entry_id, update in items]
        pipe = self._redis.pipeline(transaction=False)
        for shard, entry_id, update in items:
            keys, args = self._settle_call(shard, entry_id, update, None, None, None)
            await self._settle(keys=keys, args=args, client=pipe)
        async with store_errors("settling outbox entries"):
            replies = await pipe.execute()
        return [as_int(reply) == 1 for reply in replies]

    def _settle_call(
        self,
        shard: ShardKeys,
        entry_id: str,
        update: LedgerUpdate,
        divergence: dict[str, str] | None,
        dead: dict[str, str] | None,
        turn: MeterTurn | None,
    ) -> tuple[list[str], list[str | int]]:
        """The settle script's keys and arguments."""
        keys, args = update.block(
            divergence=divergence, divergence_maxlen=self.ledger.divergence_maxlen
        )
        keys += [
            shard.outbox,
            shard.retired if dead is not None and dead.get("reason") == RETIRED else shard.dead,
        ]
        if turn is not None:
            keys.append(turn.key)
        letter = dead or {}
        args += [
            OUTBOX_GROUP,
            entry_id,
            DEAD_MAXLEN,
            turn.token if turn is not None else "",
            len(letter),
        ]
        for name, value in letter.items():
            args += [name, value]
        return keys, args

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
            pipe.xadd(
                shard.dead,
                {"entry": payload, "reason": reason, "at": f"{at:.3f}"},
                maxlen=DEAD_MAXLEN,
                approximate=True,
            )
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
