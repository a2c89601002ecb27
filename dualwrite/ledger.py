"""The ledger (per customer, meter event name and UTC day: what each leg was meant to hold and what
it holds) and the divergence log (every event whose two legs disagree).

Updates are built here as plain values (``LedgerUpdate``) and applied by whoever owns the atomic step:
the engine queues them in the transaction that enqueues the shadow write, the outbox worker applies
them in the script that acknowledges the entry. So a ledger change never happens without the state
change it describes, and never twice. Every such script also refreshes the row's copy in its rollup
(``dualwrite.rollups``, ``LedgerUpdate.rollup_keys``), which is what reports over many customers read.

Counter fields of one ledger hash (``<leg>`` is ``legacy`` or ``meter``):

==============================  ===========================================================================
``events`` / ``quantity``       usage recorded: the authoritative write succeeded (the caller was told so)
``<leg>_expected_*``            what the leg should hold: the authoritative leg, plus the shadow once enqueued
``<leg>_accepted_*``            what Stripe accepted on the leg
``<leg>_failed_*``              shadow writes refused for good or expired (dead letters): divergence
``<leg>_retired_*``             legacy shadow writes refused because the item left the legacy system
``meter_late_refused_*``        meter events Stripe accepted, then refused in an error report (divergence)
``<leg>_refused_events``        authoritative refusals handed back to callers (not divergence)
``translated_events``           legacy ``set`` events sent to the meter as a difference
``delayed_events``              events whose commit waited in the local spool while Redis was down
``meter_backfilled_*``          meter events ``dualwrite backfill`` replayed from legacy usage (also in
                                ``meter_expected_*`` and ``meter_accepted_*``)
``divergent_events``            events written to the divergence log
``<leg>_failed_code:<code>``    shadow failures per Stripe error code (``expired``: too old)
``<leg>_refused_code:<code>``   authoritative refusals per Stripe error code
``stage_<stage>_events``        events recorded while the customer was at that stage
==============================  ===========================================================================

Quantities are *effective*: what the event adds to the period's total. For ``increment`` that is the
quantity; for a translated ``set`` it is the difference from the value set before at that timestamp,
which is also what Stripe's legacy total moves by.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.models import Leg, Stage, StripeFailure, UsageEvent, WriteResult
from dualwrite.periods import Period, period_of
from dualwrite.redis_client import as_int, as_str, as_str_list, store_errors, stream_entries
from dualwrite.rollups import (
    ROLLUP_LUA,
    collector_paused,
    parse_counters,
    read_rollups,
    rollup_key,
)

__all__ = [
    "COUNTER_FIELDS",
    "DivergenceKind",
    "DivergenceRecord",
    "Ledger",
    "LedgerRow",
    "LedgerUpdate",
    "LegView",
    "divergence_fields",
    "failure_code",
    "period_score",
    "safe_code",
]

DivergenceKind = Literal["shadow_refused", "shadow_expired", "translated", "late_refusal"]
"""Why an event's legs disagree: the shadow was refused for good, it expired in the outbox, a ``set``
was translated, or Stripe refused a meter event after accepting it."""

COUNTER_FIELDS = (
    "events",
    "quantity",
    *(
        f"{leg}_{what}_{unit}"
        for leg in ("legacy", "meter")
        for what in ("expected", "accepted", "failed", "retired")
        for unit in ("events", "qty")
    ),
    "meter_late_refused_events",
    "meter_late_refused_qty",
    "meter_backfilled_events",
    "meter_backfilled_qty",
    "legacy_refused_events",
    "meter_refused_events",
    "translated_events",
    "delayed_events",
    "divergent_events",
    *(f"stage_{stage.value}_events" for stage in Stage),
)

_EPOCH = date(1970, 1, 1)


def safe_code(code: str | None) -> str:
    """A Stripe error code fit for a counter name (``unknown`` when there is none)."""
    cleaned = "".join(ch for ch in (code or "") if ch.isalnum() or ch in "_-")[:64]
    return cleaned or "unknown"


def failure_code(failure: StripeFailure | None, *, expired: bool = False) -> str:
    """The code a failure is counted under: Stripe's code, else its type (``expired`` for age)."""
    if expired:
        return "expired"
    if failure is None:
        return "unknown"
    return safe_code(failure.code or failure.type)


def period_score(period: str) -> int:
    """The sort score of a period id (a UTC day or a billing period): its first day's number."""
    return period_of(period).start // 86_400


@dataclass(slots=True)
class LedgerUpdate:
    """Counter increments for one ledger hash, ready to be applied atomically with their cause."""

    keys: ShardKeys
    event: UsageEvent
    period: str | None = None
    """The ledger period id (default: the event's UTC day)."""
    increments: dict[str, int] = field(default_factory=dict)

    @property
    def period_id(self) -> str:
        """The period this update counts in."""
        return self.period or self.event.period

    @property
    def key(self) -> str:
        """The ledger hash this update applies to."""
        return self.keys.ledger(self.period_id, self.event.customer, self.event.event_name)

    @property
    def index_member(self) -> str:
        """The ledger index entry naming the hash."""
        return f"{self.period_id}|{self.event.customer}|{self.event.event_name}"

    @property
    def index_score(self) -> int:
        """The ledger index score (the period's first day's number)."""
        return period_score(self.period_id)

    @property
    def rollup_keys(self) -> list[str]:
        """The rollup hash holding this row's copy, then the rollup index (``dualwrite.rollups``):
        every script applying the update also passes these to ``ledger_rollup``."""
        return [rollup_key(self.keys, self.period_id), self.keys.rollup_index]

    def add(self, name: str, amount: int = 1) -> LedgerUpdate:
        """Add ``amount`` to counter ``name``."""
        self.increments[name] = self.increments.get(name, 0) + amount
        return self

    def recorded(
        self,
        stage: Stage,
        authoritative: Leg,
        shadow: Leg | None,
        quantity: int,
        *,
        translated: bool,
    ) -> LedgerUpdate:
        """The authoritative write succeeded and the shadow (if any) is enqueued."""
        self.add("events").add("quantity", quantity).add(f"stage_{stage.value}_events")
        self._leg(authoritative, "expected", quantity)._leg(authoritative, "accepted", quantity)
        if shadow is not None:
            self._leg(shadow, "expected", quantity)
        if translated:
            self.add("translated_events")
        return self

    def refused(self, leg: Leg, code: str | None = None) -> LedgerUpdate:
        """The authoritative write was refused; the caller gets Stripe's error."""
        self.add(f"{leg.value}_refused_events")
        return self.add(f"{leg.value}_refused_code:{safe_code(code)}")

    def shadow_accepted(self, leg: Leg, quantity: int) -> LedgerUpdate:
        """A shadow write was accepted by Stripe."""
        return self._leg(leg, "accepted", quantity)

    def shadow_failed(
        self, leg: Leg, quantity: int, *, retired: bool, code: str | None = None
    ) -> LedgerUpdate:
        """A shadow write was refused for good or expired; ``retired`` ones are not divergence."""
        if retired:
            return self._leg(leg, "retired", quantity)
        self.add(f"{leg.value}_failed_code:{safe_code(code)}")
        return self._leg(leg, "failed", quantity).add("divergent_events")

    def late_refused(self, quantity: int) -> LedgerUpdate:
        """Stripe refused, in an error report, a meter event it had accepted: divergence."""
        self.add("meter_accepted_events", -1).add("meter_accepted_qty", -quantity)
        self.add("meter_late_refused_events").add("meter_late_refused_qty", quantity)
        return self.add("divergent_events")

    def _leg(self, leg: Leg, what: str, quantity: int) -> LedgerUpdate:
        self.add(f"{leg.value}_{what}_events")
        return self.add(f"{leg.value}_{what}_qty", quantity)

    def queue(self, pipe: aioredis.client.Pipeline) -> None:
        """Queue the increments (with the index entry and the rollup copy) on a pipeline, as one
        script."""
        keys = [self.key, self.keys.ledger_index, *self.rollup_keys]
        args = [self.index_member, self.index_score, *self.script_args()]
        pipe.eval(_QUEUED_UPDATE, len(keys), *keys, *args)

    def script_args(self) -> list[str | int]:
        """The increments flattened for a Lua script: count, then name/amount pairs."""
        flat: list[str | int] = [len(self.increments)]
        for name, amount in self.increments.items():
            flat += [name, amount]
        return flat


class LegView(BaseModel):
    """One leg's side of a divergent event."""

    model_config = ConfigDict(frozen=True)

    status: Literal["accepted", "refused", "expired", "not_written", "pending"]
    stripe_id: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, result: WriteResult) -> LegView:
        """The view of a completed write."""
        if result.accepted:
            return cls(status="accepted", stripe_id=result.stripe_id)
        return cls(status="refused", error=describe_failure(result.failure))


def describe_failure(failure: StripeFailure | None) -> str | None:
    """``status code: message`` for logs and the divergence log."""
    if failure is None:
        return None
    code = failure.code or failure.type
    return f"{failure.http_status or 'network'} {code}: {failure.message}"


def divergence_fields(
    event: UsageEvent,
    *,
    kind: DivergenceKind,
    stage: Stage,
    legacy: LegView,
    meter: LegView,
    note: str = "",
    at: float | None = None,
) -> dict[str, str]:
    """The stream fields of one divergence entry, both legs' Stripe ids and errors included."""
    return {
        "at": f"{at if at is not None else time.time():.3f}",
        "kind": kind,
        "identifier": event.identifier,
        "customer": event.customer,
        "event_name": event.event_name,
        "period": event.period,
        "stage": stage.value,
        "quantity": str(event.quantity),
        "action": event.action,
        "subscription_item": event.subscription_item or "",
        "legacy": legacy.model_dump_json(),
        "meter": meter.model_dump_json(),
        "note": note,
    }


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


class DivergenceRecord(BaseModel):
    """One entry of the divergence log."""

    model_config = ConfigDict(frozen=True)

    id: str
    at: float
    kind: str
    identifier: str
    customer: str
    event_name: str
    period: str
    stage: str
    quantity: int
    action: str
    subscription_item: str | None
    legacy: LegView
    meter: LegView
    note: str

    @classmethod
    def from_stream(cls, entry_id: str, fields: dict[str, str]) -> DivergenceRecord:
        """Parse one stream entry."""
        return cls(
            id=entry_id,
            at=float(fields.get("at", 0)),
            kind=fields.get("kind", ""),
            identifier=fields.get("identifier", ""),
            customer=fields.get("customer", ""),
            event_name=fields.get("event_name", ""),
            period=fields.get("period", ""),
            stage=fields.get("stage", ""),
            quantity=int(fields.get("quantity", 0)),
            action=fields.get("action", ""),
            subscription_item=fields.get("subscription_item") or None,
            legacy=LegView.model_validate(json.loads(fields.get("legacy", "{}") or "{}")),
            meter=LegView.model_validate(json.loads(fields.get("meter", "{}") or "{}")),
            note=fields.get("note", ""),
        )


# KEYS: ledger row, ledger index, rollup, rollup index; ARGV: index member, index score, then a count
# and name/amount pairs.
_QUEUED_UPDATE = (
    ROLLUP_LUA
    + """
local n = tonumber(ARGV[3])
for i = 0, n - 1 do redis.call('HINCRBY', KEYS[1], ARGV[4 + 2 * i], ARGV[5 + 2 * i]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
ledger_rollup(KEYS[1], ARGV[1], ARGV[2], KEYS[3], KEYS[4])
return 1
"""
)

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
    """Reads the ledger and the divergence log back (writes happen with their causes, see above)."""

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

        Without ``customer``, rows come from the rollups (``dualwrite.rollups``): a few large hashes
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
