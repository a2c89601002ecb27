"""Ledger rollups: a copy of every ledger row, packed by period span, so a report reads few hashes.

A report over 100,000 customers would otherwise read 130,000 small hashes. So every script that
changes a ledger row (``P:{sN}:ledger:<period>:<cus>:<ev>``) also copies the whole row, in the same
atomic step, into one field of a rollup hash ``P:{sN}:rollup:<first>:<last>`` (``first`` and ``last``:
the UTC day numbers the row's period starts and ends in). The field is the row's ledger-index
member ``<period>|<cus>|<ev>``; the value is the row's counters packed as a JSON list
(``[1,0,40,1,1234,…]``: the layout's version, then each counter's position in ``PACKED_FIELDS``
and its value, any other counter in a final object), written from the very strings ``HGETALL`` returned, so
nothing is rounded, and many rows parse in one ``json.loads``. Issue 20 packed them: a copy with
its counters named (``{"events":40,"quantity":1234,…}``, still read) took about three times the
bytes, as much as the row itself. The copy is made after the increments, in the
script that made them: a rollup can never disagree with its row.

A report reads the rollups whose days overlap its range (``P:{sN}:rollup-index``, scored by first
day): a few dozen large hashes, in chunks, instead of one hash per row.

Rows written before rollups existed are copied in once per shard (``backfill``), before the first
read; ``P:{sN}:rollup-ready`` records that. A copy is a snapshot, not an increment, so copying a row
a writer is changing at the same time cannot count anything twice.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import redis.asyncio as aioredis

from dualwrite.keys import ShardKeys
from dualwrite.periods import Period, period_of
from dualwrite.redis_client import as_int, as_str, as_str_list, store_errors

__all__ = [
    "PACKED_FIELDS",
    "PACKED_VERSION",
    "ROLLUP_LUA",
    "RolledRow",
    "backfill",
    "collector_paused",
    "list_customer_rows",
    "parse_counters",
    "read_customer_rows",
    "read_packed",
    "read_rollups",
    "rollup_key",
]

DAY = 86_400

#: The counters a packed row copy names by their position here (version 1 of the layout; never
#: reorder: add a version instead). Any other counter (failure codes) rides in a final JSON object.
PACKED_FIELDS: tuple[str, ...] = (
    "events",
    "quantity",
    "legacy_expected_events",
    "legacy_expected_qty",
    "legacy_accepted_events",
    "legacy_accepted_qty",
    "meter_expected_events",
    "meter_expected_qty",
    "meter_accepted_events",
    "meter_accepted_qty",
    "legacy_failed_events",
    "legacy_failed_qty",
    "meter_failed_events",
    "meter_failed_qty",
    "legacy_retired_events",
    "legacy_retired_qty",
    "meter_late_refused_events",
    "meter_late_refused_qty",
    "legacy_refused_events",
    "meter_refused_events",
    "translated_events",
    "delayed_events",
    "meter_backfilled_events",
    "meter_backfilled_qty",
    "divergent_events",
    "stage_legacy_events",
    "stage_shadow_events",
    "stage_primary_events",
    "stage_meter_events",
)
PACKED_VERSION = 1

ROLLUP_LUA = (
    """
-- dualwrite.ledger._rollups: copy ledger row `row` (index member `member`, first day `score`) into
-- rollup hash `rollup`, and list that rollup in `rollups`, packed: [1,<position>,<value>,…,{others}].
-- Counter names are letters, digits, '_', '-' and ':' (``safe_code``) and values are integers,
-- so the JSON needs no escaping, and no value goes through a Lua number (a double).
local ROLLUP_AT = {"""
    + ", ".join(f"{name}='{at}'" for at, name in enumerate(PACKED_FIELDS))
    + """}
-- dualwrite.guard (issue 20): row `member` changed. List its customer in the shard's changed set
-- (the guard judges only those, then clears it) and, for a row new to its rollup, among the
-- customer's rows. Both keys are named from `rollups`: the same hash tag, so the same slot.
local function guard_changed(rollups, member, new)
  local tag = string.sub(rollups, 1, -#'rollup-index' - 1)
  local period, customer, event = string.match(member, '^([^|]*)|([^|]*)|(.*)$')
  redis.call('SADD', tag .. 'guard-changed', customer)
  if new == 1 then
    local rows, line = tag .. 'customer-rows', period .. '|' .. event
    local had = redis.call('HGET', rows, customer)
    redis.call('HSET', rows, customer, had and (had .. '\\n' .. line) or line)
  end
end
local function ledger_rollup(row, member, score, rollup, rollups)
  local h = redis.call('HGETALL', row)
  local parts, others = {'"""
    + str(PACKED_VERSION)
    + """'}, {}
  for j = 1, #h, 2 do
    local at = ROLLUP_AT[h[j]]
    if at then
      parts[#parts + 1] = at
      parts[#parts + 1] = h[j + 1]
    else
      others[#others + 1] = '"' .. h[j] .. '":' .. h[j + 1]
    end
  end
  if #others > 0 then parts[#parts + 1] = '{' .. table.concat(others, ',') .. '}' end
  local new = redis.call('HSET', rollup, member, '[' .. table.concat(parts, ',') .. ']')
  redis.call('ZADD', rollups, score, rollup)
  guard_changed(rollups, member, new)
end
"""
)
"""A Lua function, ``ledger_rollup(row, member, score, rollup, rollups)``: ``ledger_script``
prepends it to every script that writes the ledger, whose ``ledger_update()`` calls it after the
increments; ``backfill`` calls it alone."""

# KEYS: row, rollup, row, rollup, ...; ARGV: member, score, member, score, ...; plus the index last.
_BACKFILL = (
    ROLLUP_LUA
    + """
local index = KEYS[#KEYS]
for i = 1, (#KEYS - 1) / 2 do
  if redis.call('EXISTS', KEYS[2 * i - 1]) == 1 then
    ledger_rollup(KEYS[2 * i - 1], ARGV[2 * i - 1], ARGV[2 * i], KEYS[2 * i], index)
  end
end
return 1
"""
)
_BACKFILL_CHUNK = 500
#: Rollup fields read per call: large enough that a call costs little, small enough that Redis is
#: never busy with one for long.
_SCAN_COUNT = 5_000

RolledRow = tuple[str, str]
"""One rollup field as read: the index member ``<period>|<cus>|<ev>`` and the packed counters."""


def rollup_key(shard: ShardKeys, period: str) -> str:
    """The rollup hash holding the copy of ledger rows of ``period``."""
    span = period_of(period)  # cached: every settle and commit asks, strptime is slow
    return shard.rollup(span.start // DAY, (span.end - 1) // DAY)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a block that builds many acyclic objects.

    Reading 100,000 customers makes a few hundred thousand dicts and models, none in a cycle; every
    automatic collection meanwhile walks all of them again, which doubled the report's CPU time.
    Use it around synchronous code only (no ``await`` inside), so other tasks are not affected.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            # Hand what the block made straight to the oldest generation (two list splices):
            # otherwise the next young collection walks all of it once more, ~0.4 s here.
            gc.freeze()
            gc.unfreeze()
        if enabled:
            gc.enable()


def parse_counters(packed: Sequence[str]) -> list[dict[str, int]]:
    """The counters of many row copies, parsed at once (one ``json.loads``). A copy is a packed
    list (``[1, position, value, …, {other counters}]``), or, written before issue 20, a JSON
    object of every counter; either way exactly the row's counters."""
    rows: list[Any] = json.loads("[" + ",".join(packed) + "]")
    counters: list[dict[str, int]] = []
    name = PACKED_FIELDS.__getitem__
    for row in rows:
        if type(row) is dict:
            counters.append(row)
            continue
        last = row[-1]
        if type(last) is dict:
            found: dict[str, int] = dict(zip(map(name, row[1:-1:2]), row[2:-1:2], strict=True))
            found.update(last)
        else:
            found = dict(zip(map(name, row[1::2]), row[2::2], strict=True))
        counters.append(found)
    return counters


def _days(rollup: str) -> tuple[int, int]:
    _, first, last = rollup.rsplit(":", 2)
    return int(first), int(last)


async def read_rollups(
    redis: aioredis.Redis, shard: ShardKeys, *, low: int | None, high: int | None
) -> list[RolledRow]:
    """Every row copy of ``shard`` whose period overlaps UTC day numbers ``[low, high]``.

    A period overlaps the range exactly when it starts on or before day ``high`` and ends on or
    after day ``low``, which the rollup's name says, so no row is read only to be dropped.
    """
    if not await redis.exists(shard.rollup_ready):
        await backfill(redis, shard)
    return await read_packed(redis, shard.rollup_index, low=low, high=high)


async def read_packed(
    redis: aioredis.Redis, index: str, *, low: int | None, high: int | None
) -> list[RolledRow]:
    """Every field of the rollups listed in ``index`` (hashes named ``…:<first>:<last>``, scored by
    first day) whose days overlap ``[low, high]``, in chunks."""
    rollups = [
        rollup
        for rollup in as_str_list(
            await redis.zrangebyscore(index, "-inf", "+inf" if high is None else high)
        )
        if low is None or _days(rollup)[1] >= low
    ]
    pipe = redis.pipeline(transaction=False)
    for rollup in rollups:
        pipe.hlen(rollup)
    sizes = [as_int(size) for size in await pipe.execute()]
    rows: list[RolledRow] = []
    small = [rollup for rollup, size in zip(rollups, sizes, strict=True) if size <= _SCAN_COUNT]
    for start in range(0, len(small), 8):
        pipe = redis.pipeline(transaction=False)
        for rollup in small[start : start + 8]:
            pipe.hgetall(rollup)
        for found in await pipe.execute():
            rows += found.items()
    for rollup, size in zip(rollups, sizes, strict=True):
        if size > _SCAN_COUNT:
            cursor = 0
            while True:
                cursor, found = await redis.hscan(rollup, cursor, count=_SCAN_COUNT)
                rows += cast(dict[str, str], found).items()
                if cursor == 0:
                    break
    return rows


async def backfill(redis: aioredis.Redis, shard: ShardKeys) -> int:
    """Copy every ledger row of ``shard`` into its rollup, then mark the shard ready; returns how
    many rows were listed. Safe to run again, and while writers run."""
    script = redis.register_script(_BACKFILL)
    listed = 0
    async with store_errors("copying ledger rows into rollups"):
        members = as_str_list(await redis.zrange(shard.ledger_index, 0, -1))
        for start in range(0, len(members), _BACKFILL_CHUNK):
            keys: list[str] = []
            args: list[str | int] = []
            for member in members[start : start + _BACKFILL_CHUNK]:
                period, customer, event_name = member.split("|", 2)
                span = Period.parse(period)
                keys += [shard.ledger(period, customer, event_name), rollup_key(shard, period)]
                args += [member, span.start // DAY]
            await script(keys=[*keys, shard.rollup_index], args=args)
            listed += len(keys) // 2
        await redis.set(shard.rollup_ready, "1")
    return listed


# KEYS: customer-rows; ARGV: customer, lines (one a line), customer, lines, ...: adds the lines a
# customer's entry lacks (a writer may have listed some of them meanwhile).
_LIST_ROWS = """
for i = 1, #ARGV, 2 do
  local had = redis.call('HGET', KEYS[1], ARGV[i])
  if not had then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    local seen, add = {}, {}
    for line in string.gmatch(had, '[^\\n]+') do seen[line] = true end
    for line in string.gmatch(ARGV[i + 1], '[^\\n]+') do
      if not seen[line] then add[#add + 1] = line end
    end
    if #add > 0 then redis.call('HSET', KEYS[1], ARGV[i], had .. '\\n' .. table.concat(add, '\\n')) end
  end
end
return 1
"""
#: Customers read (or listed) per call.
_CUSTOMER_CHUNK = 1_000


async def list_customer_rows(redis: aioredis.Redis, shard: ShardKeys) -> int:
    """List every ledger row of ``shard`` under its customer (``ShardKeys.customer_rows``), then
    mark the shard ready; returns how many customers were listed. The ledger's writers list the
    rows they create themselves; this lists the rows written before they did. Safe to run again,
    and while writers run."""
    script = redis.register_script(_LIST_ROWS)
    async with store_errors("listing ledger rows by customer"):
        by_customer: dict[str, list[str]] = {}
        for member in as_str_list(await redis.zrange(shard.ledger_index, 0, -1)):
            period, customer, event_name = member.split("|", 2)
            by_customer.setdefault(customer, []).append(f"{period}|{event_name}")
        pairs = list(by_customer.items())
        for start in range(0, len(pairs), _CUSTOMER_CHUNK):
            args: list[str] = []
            for customer, lines in pairs[start : start + _CUSTOMER_CHUNK]:
                args += [customer, "\n".join(lines)]
            await script(keys=[shard.customer_rows], args=args)
        await redis.set(shard.customer_rows_ready, "1")
    return len(pairs)


async def read_customer_rows(
    redis: aioredis.Redis,
    shard: ShardKeys,
    customers: Sequence[str],
    *,
    low: int | None,
    high: int | None,
) -> list[RolledRow]:
    """The row copies of ``customers`` (all of ``shard``) whose period overlaps UTC day numbers
    ``[low, high]``: what ``read_rollups`` would return for them, at a cost in proportion to their
    rows rather than to the shard's."""
    if not await redis.exists(shard.rollup_ready):
        await backfill(redis, shard)
    if not await redis.exists(shard.customer_rows_ready):
        await list_customer_rows(redis, shard)
    wanted: dict[str, list[str]] = {}  # rollup → members
    for start in range(0, len(customers), _CUSTOMER_CHUNK):
        chunk = customers[start : start + _CUSTOMER_CHUNK]
        listed = await redis.hmget(shard.customer_rows, list(chunk))
        for customer, lines in zip(chunk, listed, strict=True):
            text = as_str(lines)
            if not text:
                continue  # no ledger rows in this shard
            for line in text.split("\n"):
                period, event_name = line.split("|", 1)
                span = period_of(period)
                first, last = span.start // DAY, (span.end - 1) // DAY
                if (low is not None and last < low) or (high is not None and first > high):
                    continue
                member = f"{period}|{customer}|{event_name}"
                wanted.setdefault(shard.rollup(first, last), []).append(member)
    rows: list[RolledRow] = []
    rollups = list(wanted.items())
    for start in range(0, len(rollups), 8):
        pipe = redis.pipeline(transaction=False)
        for rollup, members in rollups[start : start + 8]:
            pipe.hmget(rollup, members)
        for (_, members), found in zip(
            rollups[start : start + 8], await pipe.execute(), strict=True
        ):
            rows += [
                (member, str(as_str(packed)))
                for member, packed in zip(members, found, strict=True)
                if packed is not None
            ]
    return rows
