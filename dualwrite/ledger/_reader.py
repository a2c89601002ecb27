"""The ledger reader: rows back from their hashes (one customer) or their rollup copies (all), and
the divergence log."""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis.asyncio as aioredis

from dualwrite.keys import KeySpace
from dualwrite.ledger._divergence import DivergenceRecord
from dualwrite.ledger._rollups import RolledRow, collector_paused, parse_counters, read_rollups
from dualwrite.ledger._update import period_score
from dualwrite.periods import Period, period_of
from dualwrite.redis_client import as_int, as_str, as_str_list, store_errors, stream_entries

__all__ = ["Ledger", "LedgerRow"]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One ledger hash: a customer's usage of one meter event name in one period.

    A plain slotted dataclass, not a pydantic model: a report over 100,000 customers makes hundreds
    of thousands of these.
    """

    period: str
    customer: str
    event_name: str
    counters: dict[str, int]

    def __getitem__(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def span(self) -> Period:
        """The period as start and end times (a billing period, or a UTC day)."""
        return period_of(self.period)


# KEYS: ledger hashes. One JSON reply for all of them, a list of {counter: "value"} objects (a few
# thousand hashes per call): json.loads parses it in C, far faster than as many HGETALL replies.
# Values stay strings: cjson would write numbers with 14 significant digits, and a counter can hold
# more (meter values go up to 15 digits, and counters add them up).
_READ_ROWS = """
local out = {}
for i, key in ipairs(KEYS) do
  local h = redis.call('HGETALL', key)
  local row = {}
  for j = 1, #h, 2 do row[h[j]] = h[j + 1] end
  out[i] = row
end
return cjson.encode(out)
"""
_READ_CHUNK = 2000


def _period_end(period_id: str) -> int:
    return period_of(period_id).end


class Ledger:
    """Reads the ledger and the divergence log back (writes happen with their causes: ``ledger_script``)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, *, divergence_maxlen: int = 100_000):
        self._redis = redis
        self._keys = keys
        self.divergence_maxlen = divergence_maxlen
        self._read_rows = redis.register_script(_READ_ROWS)

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client the ledger reads."""
        return self._redis

    @property
    def keys(self) -> KeySpace:
        """The key layout the ledger reads."""
        return self._keys

    async def rows(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        customer: str | None = None,
    ) -> list[LedgerRow]:
        """Every ledger hash whose period overlaps the UTC days ``[since, until]`` (``YYYY-MM-DD``,
        inclusive).

        Without ``customer``, rows come from the rollups (``dualwrite.ledger._rollups``): a few large hashes
        per shard. For one customer, from its own hashes through the ledger index.
        """
        low = period_score(since) if since else None
        high = period_score(until) if until else None
        if customer is None:
            return await self._rolled_rows(low, high)
        shards = [self._keys.for_customer(customer)]
        rows: list[LedgerRow] = []
        async with store_errors("reading the ledger"):
            for shard in shards:
                # Scores are period start days; a period starting before ``since`` may still
                # overlap it, so read from 62 days earlier (longer than any monthly period) and
                # check each period's end.
                floor: int | str = low - 62 if low is not None else "-inf"
                members = as_str_list(
                    await self._redis.zrangebyscore(
                        shard.ledger_index, floor, high if high is not None else "+inf"
                    )
                )
                wanted = [
                    member.split("|", 2)
                    for member in members
                    if member.split("|")[1] == customer
                    and (low is None or _period_end(member.split("|", 1)[0]) > low * 86_400)
                ]
                for start in range(0, len(wanted), _READ_CHUNK):
                    chunk = wanted[start : start + _READ_CHUNK]
                    keys = [shard.ledger(period, cus, event) for period, cus, event in chunk]
                    read = json.loads(as_str(await self._read_rows(keys=keys)) or "[]")
                    # cjson writes an empty list as {}: only a chunk of one empty hash can be.
                    found = read if isinstance(read, list) else [{}]
                    for (period, cus, event_name), raw in zip(chunk, found, strict=True):
                        counters = {name: int(value) for name, value in (raw or {}).items()}
                        rows.append(LedgerRow(period, cus, event_name, counters))
        return rows

    async def rolled(
        self, *, since: str | None = None, until: str | None = None
    ) -> list[RolledRow]:
        """The rollup copies (``dualwrite.ledger._rollups``) of every row ``rows()`` would return,
        as read: index members and packed counters, unparsed, for a reader that parses them its
        own way (the report, over a million customers, without a dict per row)."""
        low = period_score(since) if since else None
        high = period_score(until) if until else None
        found: list[RolledRow] = []
        async with store_errors("reading the ledger"):
            for shard in self._keys.all_shards():
                found += await read_rollups(self._redis, shard, low=low, high=high)
        return found

    async def _rolled_rows(self, low: int | None, high: int | None) -> list[LedgerRow]:
        rows: list[LedgerRow] = []
        async with store_errors("reading the ledger"):
            for shard in self._keys.all_shards():
                found = await read_rollups(self._redis, shard, low=low, high=high)
                with collector_paused():
                    counters = parse_counters([packed for _, packed in found])
                    for (member, _), row in zip(found, counters, strict=True):
                        period, customer, event_name = member.split("|", 2)
                        rows.append(LedgerRow(period, customer, event_name, row))
        return rows

    async def divergences(
        self, *, limit: int = 100, customer: str | None = None
    ) -> list[DivergenceRecord]:
        """The newest divergence entries (across shards), newest first."""
        if limit <= 0:
            return []
        shards = [self._keys.for_customer(customer)] if customer else self._keys.all_shards()
        records: list[DivergenceRecord] = []
        async with store_errors("reading the divergence log"):
            for shard in shards:
                batch = limit if customer is None else max(limit * 20, 1000)
                entries = stream_entries(await self._redis.xrevrange(shard.divergence, count=batch))
                for entry_id, fields in entries:
                    record = DivergenceRecord.from_stream(entry_id, fields)
                    if customer is None or record.customer == customer:
                        records.append(record)
        records.sort(key=lambda record: record.at, reverse=True)
        return records[:limit]

    async def divergence_count(self) -> int:
        """How many entries the divergence log holds now (after capping)."""
        total = 0
        async with store_errors("reading the divergence log"):
            for shard in self._keys.all_shards():
                total += as_int(await self._redis.xlen(shard.divergence))
        return total
