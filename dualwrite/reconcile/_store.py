"""Reconciliation records in Redis.

A record is a hash ``P:{sN}:recon:<period>:<cus>:<ev>`` (the last run overwrites it whole; its
fields are ``ReconciliationRecord.to_fields``) listed in ``P:{sN}:recon-index`` by the period's first
day, like the ledger; the same transaction copies the fields a report sums (``ROLLUP_FIELDS``), as
JSON, into ``P:{sN}:recon-rollup:<first>:<last>`` (the days its period spans), so that a report over
100,000 customers reads a few hashes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.typing import EncodableT

from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.ledger import period_score, read_packed
from dualwrite.periods import Period
from dualwrite.reconcile._records import PeriodChoice, ReconciliationRecord
from dualwrite.redis_client import as_str_list, store_errors

__all__ = [
    "ROLLUP_FIELDS",
    "read_reconciliation",
    "read_reconciliation_fields",
    "save_records",
]

_DAY = 86_400


async def save_records(
    redis: aioredis.Redis, keys: KeySpace, records: Iterable[ReconciliationRecord]
) -> None:
    """Store records, each replacing the last one of its customer, event name and period.

    Raises:
        StoreUnavailableError: Redis could not be reached.
    """
    by_shard: dict[int, list[ReconciliationRecord]] = {}
    for record in records:
        by_shard.setdefault(keys.shard_of(record.customer), []).append(record)
    async with store_errors("saving reconciliation records"):
        for shard_index, batch in by_shard.items():
            shard = keys.shard(shard_index)
            for start in range(0, len(batch), 500):
                pipe = redis.pipeline(transaction=True)
                for record in batch[start : start + 500]:
                    key = shard.reconciliation(record.period, record.customer, record.event_name)
                    member = f"{record.period}|{record.customer}|{record.event_name}"
                    pipe.delete(key)
                    text = record.to_fields()
                    fields: dict[EncodableT, EncodableT] = dict(text.items())
                    pipe.hset(key, mapping=fields)
                    pipe.zadd(shard.reconciliation_index, {member: period_score(record.period)})
                    rollup = _rollup_key(shard, record.period)
                    summary = {name: text[name] for name in ROLLUP_FIELDS}
                    pipe.hset(rollup, member, json.dumps(summary))
                    pipe.zadd(
                        shard.reconciliation_rollup_index, {rollup: period_score(record.period)}
                    )
                await pipe.execute()


def _rollup_key(shard: ShardKeys, period: str) -> str:
    span = Period.parse(period)
    return shard.reconciliation_rollup(span.start // _DAY, (span.end - 1) // _DAY)


ROLLUP_FIELDS = (
    "customer",
    "checked_at",
    *(
        f"{leg}_{name}"
        for leg in ("legacy", "meter")
        for name in ("expected_qty", "accepted_qty", "stripe_qty", "skipped")
    ),
    "money_currency",
    "money_legacy_amount",
    "money_meter_amount",
    "money_skipped",
    "money_preview_legacy_amount",
    "money_preview_meter_amount",
)
"""The fields of a record its rollup copy keeps: what the report sums (``dualwrite.report``)."""

# KEYS: record, rollup, record, rollup, ..., then the rollup index; ARGV: the number of fields,
# the fields (ROLLUP_FIELDS), then member, score, member, score... Values are strings (cjson writes
# strings exactly).
_BACKFILL = """
local index = KEYS[#KEYS]
local n = tonumber(ARGV[1])
local names = {}
for j = 1, n do names[j] = ARGV[1 + j] end
for i = 1, (#KEYS - 1) / 2 do
  if redis.call('EXISTS', KEYS[2 * i - 1]) == 1 then
    local values = redis.call('HMGET', KEYS[2 * i - 1], unpack(names))
    local t = {}
    for j = 1, n do if values[j] then t[names[j]] = values[j] end end
    redis.call('HSET', KEYS[2 * i], ARGV[n + 2 * i], cjson.encode(t))
    redis.call('ZADD', index, ARGV[n + 2 * i + 1], KEYS[2 * i])
  end
end
return 1
"""


async def _backfill(redis: aioredis.Redis, shard: ShardKeys) -> None:
    script = redis.register_script(_BACKFILL)
    members = as_str_list(await redis.zrange(shard.reconciliation_index, 0, -1))
    for start in range(0, len(members), 500):
        keys: list[str] = []
        args: list[str | int] = [len(ROLLUP_FIELDS), *ROLLUP_FIELDS]
        for member in members[start : start + 500]:
            period, customer, event_name = member.split("|", 2)
            keys += [
                shard.reconciliation(period, customer, event_name),
                _rollup_key(shard, period),
            ]
            args += [member, period_score(period)]
        await script(keys=[*keys, shard.reconciliation_rollup_index], args=args)
    await redis.set(shard.reconciliation_rollup_ready, "1")


async def read_reconciliation_fields(
    redis: aioredis.Redis,
    keys: KeySpace,
    *,
    since: str | None = None,
    until: str | None = None,
) -> list[dict[str, str]]:
    """Every stored reconciliation record whose period overlaps the UTC days ``[since, until]``,
    as its ``ROLLUP_FIELDS`` (strings, as in ``ReconciliationRecord.to_fields``), read from the
    rollups: a report over 100,000 customers reads a few large hashes, not one per record.

    Raises:
        StoreUnavailableError: Redis could not be reached.
    """
    low = period_score(since) if since else None
    high = period_score(until) if until else None
    found: list[dict[str, str]] = []
    async with store_errors("reading reconciliation records"):
        for shard in keys.all_shards():
            if not await redis.exists(shard.reconciliation_rollup_ready):
                await _backfill(redis, shard)
            packed = await read_packed(redis, shard.reconciliation_rollup_index, low=low, high=high)
            found += json.loads("[" + ",".join(value for _, value in packed) + "]")
    return found


async def read_reconciliation(
    redis: aioredis.Redis,
    keys: KeySpace,
    *,
    customer: str | None = None,
    period: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[ReconciliationRecord]:
    """The stored reconciliation records, sorted by period, customer and event name.

    ``period`` is a billing period id (that period only) or a date (every period holding that UTC
    day); ``since``/``until`` (``YYYY-MM-DD``, inclusive) keep periods overlapping those days, as
    ``Ledger.rows`` does.

    Raises:
        ValueError: ``period`` is neither a period id nor a date.
        StoreUnavailableError: Redis could not be reached.
    """
    choice = PeriodChoice.parse(period) if period else None
    low = period_score(since) if since else None
    high = period_score(until) if until else None
    if choice is not None:
        first, last = (period_score(day) for day in choice.days)
        low = first if low is None else max(low, first)
        high = last if high is None else min(high, last)
    shards = [keys.for_customer(customer)] if customer else keys.all_shards()
    records: list[ReconciliationRecord] = []
    async with store_errors("reading reconciliation records"):
        for shard in shards:
            # Scores are period start days: a period starting up to 62 days before ``low`` (longer
            # than any monthly period) may still overlap it; each period's end is checked below.
            floor: int | str = low - 62 if low is not None else "-inf"
            members = as_str_list(
                await redis.zrangebyscore(
                    shard.reconciliation_index, floor, high if high is not None else "+inf"
                )
            )
            wanted = [
                member.split("|", 2)
                for member in members
                if (customer is None or member.split("|")[1] == customer)
                and (low is None or Period.parse(member.split("|", 1)[0]).end > low * _DAY)
                and (choice is None or choice.matches(member.split("|", 1)[0]))
            ]
            for start in range(0, len(wanted), 1000):
                chunk = wanted[start : start + 1000]
                pipe = redis.pipeline(transaction=False)
                for period_id, cus, event_name in chunk:
                    pipe.hgetall(shard.reconciliation(period_id, cus, event_name))
                for data in await pipe.execute():
                    if data:
                        fields = {str(k): str(v) for k, v in data.items()}
                        records.append(ReconciliationRecord.from_fields(fields))
    records.sort(key=lambda r: (period_score(r.period), r.period, r.customer, r.event_name))
    return records
