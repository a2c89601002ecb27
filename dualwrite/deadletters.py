"""Dead letters: shadow writes Stripe refused for good, or that expired, kept for a person to read,
replay or drop (``dualwrite dead list|show|retry|drop``).

A dead letter's id is ``<shard>:<stream id>``, or ``<shard>:retired:<stream id>`` for a retired one.
Retrying moves it back into its outbox stream as a fresh entry and takes its failure out of the
ledger (the write is pending again), in one script; dropping deletes it and leaves the ledger saying
the write failed.

Retired writes (legacy usage records Stripe refused because the item moved to its meter-backed
price) are dead letters too, with reason ``retired``, but not failures: they live in a stream of
their own (so the dead stream's length, the ``dead`` gauge, counts failures only), listings leave
them out unless asked for, and ``counts`` gives them their own count. Retired letters written to the
dead stream before they had their own stream are still read, listed and counted as retired (the
outbox moves them to the retired stream once, as it starts: ``Outbox.ensure_groups``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from dualwrite.exceptions import DeadLetterNotFoundError
from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.ledger import LedgerUpdate, ledger_script
from dualwrite.outbox import RETIRED, OutboxEntry
from dualwrite.redis_client import as_int, store_errors, stream_entries

__all__ = ["RETIRED", "DeadLetter", "DeadLetterNotFoundError", "DeadLetters"]

_RETIRED_ID = "retired:"

# KEYS and ARGV: the ledger block (``dualwrite.ledger``: the failure taken back out), then own KEYS:
# dead stream, outbox stream; own ARGV: dead id, new payload
_RETRY = ledger_script(
    """
local dead, outbox = unpack(KEYS, OWN_KEYS)
local dead_id, payload = unpack(ARGV, OWN_ARGS)
if redis.call('XDEL', dead, dead_id) == 0 then return 0 end
redis.call('XADD', outbox, '*', 'entry', payload)
ledger_update()
return 1
"""
)


class DeadLetter(BaseModel):
    """One dead letter, as the CLI shows it."""

    model_config = ConfigDict(frozen=True)

    id: str
    at: float
    reason: str
    """``refused`` (a permanent Stripe error), ``expired``, ``retired`` or ``unreadable``."""
    error: str
    code: str = ""
    """The error code its failure was counted under in the ledger."""
    entry: OutboxEntry | None
    """The outbox entry (None when it could not be parsed)."""
    raw: str


def _parse_id(dead_id: str) -> tuple[int, bool, str]:
    """A dead letter id's shard, whether it names the retired stream, and its stream id."""
    shard, _, stream_id = dead_id.partition(":")
    retired = stream_id.startswith(_RETIRED_ID)
    stream_id = stream_id.removeprefix(_RETIRED_ID)
    if not shard.isdigit() or not stream_id:
        msg = f"{dead_id!r} is not a dead letter id; ids look like 0:1732550000000-0 (see `dead list`)"
        raise DeadLetterNotFoundError(msg)
    return int(shard), retired, stream_id


def _stream(shard: ShardKeys, retired: bool) -> str:
    return shard.retired if retired else shard.dead


class DeadLetters:
    """Read, replay and drop dead letters across shards."""

    def __init__(
        self, redis: aioredis.Redis, keys: KeySpace, *, clock: Callable[[], float] = time.time
    ):
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._retry = redis.register_script(_RETRY)

    async def _scan(self, customer: str | None, *, retired: bool) -> list[DeadLetter]:
        """Every dead letter (of one customer, if given), in no particular order; the retired
        stream's too if ``retired``."""
        found: list[DeadLetter] = []
        shards = [self._keys.for_customer(customer)] if customer else self._keys.all_shards()
        streams = (False, True) if retired else (False,)
        async with store_errors("reading dead letters"):
            for shard, in_retired in ((shard, flag) for shard in shards for flag in streams):
                stream = _stream(shard, in_retired)
                entries = stream_entries(await self._redis.xrevrange(stream, count=10_000))
                for stream_id, fields in entries:
                    letter = self._letter(shard, stream_id, fields, retired=in_retired)
                    if customer and (
                        letter.entry is None or letter.entry.event.customer != customer
                    ):
                        continue
                    found.append(letter)
        return found

    async def find(
        self,
        *,
        limit: int = 50,
        customer: str | None = None,
        reason: str | None = None,
        include_retired: bool = False,
    ) -> list[DeadLetter]:
        """Dead letters, newest first, optionally for one customer or reason.

        Retired writes (usage records Stripe refused because the item moved to its meter-backed
        price) are not failures: they are left out unless ``reason`` is ``retired`` or
        ``include_retired``.
        """
        wanted_retired = reason == RETIRED if reason else include_retired
        found = [
            letter
            for letter in await self._scan(customer, retired=wanted_retired)
            if (letter.reason == reason if reason else include_retired or letter.reason != RETIRED)
        ]
        found.sort(key=lambda letter: letter.at, reverse=True)
        return found[:limit]

    async def counts(self, *, customer: str | None = None) -> dict[str, int]:
        """How many dead letters there are per reason (``retired`` included), sorted by reason."""
        counted = Counter(letter.reason for letter in await self._scan(customer, retired=True))
        return dict(sorted(counted.items()))

    async def show(self, dead_id: str) -> DeadLetter:
        """One dead letter by id.

        Raises:
            DeadLetterNotFoundError: no such dead letter.
        """
        index, retired, stream_id = _parse_id(dead_id)
        shard = self._keys.shard(index)
        stream = _stream(shard, retired)
        async with store_errors("reading a dead letter"):
            entries = stream_entries(await self._redis.xrange(stream, stream_id, stream_id))
        if not entries:
            msg = f"no dead letter {dead_id} (already retried or dropped?)"
            raise DeadLetterNotFoundError(msg)
        return self._letter(shard, *entries[0], retired=retired)

    async def retry(self, dead_ids: list[str], *, dry_run: bool = False) -> list[DeadLetter]:
        """Put dead letters back in the outbox as fresh entries; returns those (to be) retried.

        Unreadable letters cannot be retried and are left alone.
        """
        retried: list[DeadLetter] = []
        for dead_id in dead_ids:
            letter = await self.show(dead_id)
            if letter.entry is None:
                continue
            if not dry_run:
                await self._requeue(letter, letter.entry)
            retried.append(letter)
        return retried

    async def drop(self, dead_ids: list[str], *, dry_run: bool = False) -> list[DeadLetter]:
        """Delete dead letters for good (the ledger keeps counting them as failed)."""
        dropped: list[DeadLetter] = []
        for dead_id in dead_ids:
            letter = await self.show(dead_id)
            if not dry_run:
                index, retired, stream_id = _parse_id(dead_id)
                stream = _stream(self._keys.shard(index), retired)
                async with store_errors("dropping a dead letter"):
                    await self._redis.xdel(stream, stream_id)
            dropped.append(letter)
        return dropped

    async def _requeue(self, letter: DeadLetter, entry: OutboxEntry) -> None:
        index, retired, stream_id = _parse_id(letter.id)
        shard = self._keys.shard(index)
        fresh = entry.model_copy(
            update={"attempt": 0, "enqueued_at": self._clock(), "last_error": None}
        )
        failed = LedgerUpdate(shard, entry.event, entry.period).shadow_failed(
            entry.leg, entry.value, retired=letter.reason == RETIRED, code=letter.code or None
        )
        keys, args = failed.undone().block()  # the write is pending again
        keys += [_stream(shard, retired), shard.outbox]
        args += [stream_id, fresh.payload()]
        async with store_errors("retrying a dead letter"):
            done = await self._retry(keys=keys, args=args)
        if as_int(done) != 1:
            msg = f"no dead letter {letter.id} (retried or dropped meanwhile)"
            raise DeadLetterNotFoundError(msg)

    @staticmethod
    def _letter(
        shard: ShardKeys, stream_id: str, fields: dict[str, str], *, retired: bool
    ) -> DeadLetter:
        raw = fields.get("entry", "")
        try:
            entry: OutboxEntry | None = OutboxEntry.parse(raw)
        except ValueError:
            entry = None
        return DeadLetter(
            id=f"{shard.shard}:{_RETIRED_ID if retired else ''}{stream_id}",
            at=float(fields.get("at", 0) or 0),
            reason=fields.get("reason", ""),
            error=fields.get("error", ""),
            code=fields.get("code", ""),
            entry=entry,
            raw=raw,
        )
