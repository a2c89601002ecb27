"""Reconciliation records: one per customer, meter event name and period, kept in Redis.

A record is a hash ``P:{sN}:recon:<period>:<cus>:<ev>`` (the last run overwrites it whole) listed in
``P:{sN}:recon-index`` by the period's first day, like the ledger; the same transaction copies the
fields a report sums (``ROLLUP_FIELDS``), as JSON, into ``P:{sN}:recon-rollup:<first>:<last>`` (the
days its period spans), so that a report over 100,000 customers reads a few hashes. Fields,
``<leg>`` being ``legacy`` or ``meter``:

==============================  ===========================================================================
``customer`` ``event_name``     what the record is about
``period``
``checked_at``                  when the run read Stripe (Unix seconds)
``intended_qty``                usage recorded by dualwrite (the ledger's ``quantity``)
``<leg>_expected_qty``          what the leg should hold (ledger)
``<leg>_accepted_qty``          what dualwrite believes Stripe accepted on the leg (ledger)
``<leg>_stripe_qty``            what Stripe holds on the leg (empty: not compared)
``<leg>_drift``                 ``<leg>_stripe_qty - <leg>_accepted_qty`` (empty: not compared)
``<leg>_skipped``               why the leg was not compared (a ``SkipReason``; empty: compared)
``<leg>_detail``                the skip's or the comparison's details, for people
``items``                       the subscription items whose summaries make the legacy figure
``meter_id``                    the meter whose event summary makes the meter figure
``window_start`` ``window_end`` the meter summary's window (the period on minute boundaries)
``money_<field>``               the money check (``reconcile --money``; every field of ``MoneyCheck``,
                                empty when the run did not price the legs)
==============================  ===========================================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict
from redis.typing import EncodableT

from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.ledger import period_score
from dualwrite.periods import Period
from dualwrite.reconcile._money import MoneyCheck
from dualwrite.redis_client import as_str_list, store_errors
from dualwrite.rollups import read_packed

__all__ = [
    "ROLLUP_FIELDS",
    "LegCheck",
    "PeriodChoice",
    "ReconciliationRecord",
    "SkipReason",
    "read_reconciliation",
    "read_reconciliation_fields",
    "save_records",
]

SkipReason = Literal[
    "open_period",
    "not_settled",
    "day_period",
    "no_item",
    "no_summary",
    "no_meter",
    "not_comparable",
    "stripe_error",
]
"""Why a leg was not compared:

* ``open_period``: the period has not ended (or Stripe lists its summary as the open one);
* ``not_settled``: it ended less than ``settle_seconds`` ago (Stripe's summaries lag);
* ``day_period``: the ledger counts this period by UTC day, and legacy summaries are per billing
  period;
* ``no_item``: no subscription item of the customer is known to carry this event name's usage;
* ``no_summary``: no usage record summary of the item(s) covers this period;
* ``no_meter``: Stripe has no meter for this event name;
* ``not_comparable``: Stripe aggregates differently from the ledger's sum (``aggregate_usage`` other
  than ``sum``; a meter formula other than ``sum``; a pre-aggregated meter);
* ``stripe_error``: Stripe refused a read (or the network failed); the detail says how.
"""

_DAY = 86_400


class LegCheck(BaseModel):
    """One leg of a reconciliation: the ledger's figures, Stripe's, and the drift."""

    model_config = ConfigDict(frozen=True)

    expected_qty: int = 0
    accepted_qty: int = 0
    stripe_qty: int | float | None = None
    """What Stripe holds (None: not compared, see ``skipped``)."""
    drift: int | float | None = None
    """``stripe_qty - accepted_qty`` (None: not compared)."""
    skipped: SkipReason | None = None
    detail: str = ""

    @property
    def compared(self) -> bool:
        """Whether Stripe's figure was read and compared."""
        return self.skipped is None and self.stripe_qty is not None

    @property
    def drifted(self) -> bool:
        """Whether Stripe holds something other than what dualwrite believes it accepted."""
        return bool(self.drift)


class ReconciliationRecord(BaseModel):
    """The last reconciliation of one customer, meter event name and period."""

    model_config = ConfigDict(frozen=True)

    customer: str
    event_name: str
    period: str
    checked_at: float
    intended_qty: int = 0
    """What dualwrite recorded (the usage its callers were told was recorded)."""
    legacy: LegCheck = LegCheck()
    meter: LegCheck = LegCheck()
    items: list[str] = []
    """The subscription items whose usage record summaries make ``legacy.stripe_qty``."""
    meter_id: str | None = None
    window_start: int | None = None
    """The meter summary's window ``[window_start, window_end)``: the period on minute boundaries."""
    window_end: int | None = None
    money: MoneyCheck | None = None
    """What each leg's price bills (None: the run did not price the legs, see ``--money``)."""

    @property
    def drifted(self) -> bool:
        """Whether either leg drifted."""
        return self.legacy.drifted or self.meter.drifted

    def bills_differently(self, tolerance: int = 0) -> bool:
        """Whether the legs' prices bill more than ``tolerance`` apart (or in different
        currencies), or Stripe's preview billed otherwise than computed."""
        money = self.money
        return money is not None and (money.differs(tolerance) or money.preview_agrees is False)

    def to_fields(self) -> dict[str, str]:
        """The hash fields of this record (see the module docstring)."""
        fields = {
            "customer": self.customer,
            "event_name": self.event_name,
            "period": self.period,
            "checked_at": f"{self.checked_at:.3f}",
            "intended_qty": str(self.intended_qty),
            "items": ",".join(self.items),
            "meter_id": self.meter_id or "",
            "window_start": _text(self.window_start),
            "window_end": _text(self.window_end),
        }
        for name, leg in (("legacy", self.legacy), ("meter", self.meter)):
            fields |= {
                f"{name}_expected_qty": str(leg.expected_qty),
                f"{name}_accepted_qty": str(leg.accepted_qty),
                f"{name}_stripe_qty": _text(leg.stripe_qty),
                f"{name}_drift": _text(leg.drift),
                f"{name}_skipped": leg.skipped or "",
                f"{name}_detail": leg.detail,
            }
        money = self.money.model_dump() if self.money is not None else {}
        fields |= {f"money_{name}": _text(money.get(name)) for name in _MONEY_FIELDS}
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> ReconciliationRecord:
        """Parse a record hash."""

        def leg(name: str) -> LegCheck:
            return LegCheck.model_validate(
                {
                    "expected_qty": int(fields.get(f"{name}_expected_qty") or 0),
                    "accepted_qty": int(fields.get(f"{name}_accepted_qty") or 0),
                    "stripe_qty": _number(fields.get(f"{name}_stripe_qty")),
                    "drift": _number(fields.get(f"{name}_drift")),
                    "skipped": fields.get(f"{name}_skipped") or None,
                    "detail": fields.get(f"{name}_detail", ""),
                }
            )

        window_start, window_end = fields.get("window_start"), fields.get("window_end")
        money = {name: fields.get(f"money_{name}") or None for name in _MONEY_FIELDS}
        return cls(
            customer=fields.get("customer", ""),
            event_name=fields.get("event_name", ""),
            period=fields.get("period", ""),
            checked_at=float(fields.get("checked_at") or 0),
            intended_qty=int(fields.get("intended_qty") or 0),
            legacy=leg("legacy"),
            meter=leg("meter"),
            items=[item for item in fields.get("items", "").split(",") if item],
            meter_id=fields.get("meter_id") or None,
            window_start=int(window_start) if window_start else None,
            window_end=int(window_end) if window_end else None,
            money=_money(money),
        )


_MONEY_FIELDS = tuple(MoneyCheck.model_fields)
_MONEY_NUMBERS = {"legacy_qty", "meter_qty"}
_MONEY_INTS = {"legacy_amount", "meter_amount", "preview_legacy_amount", "preview_meter_amount"}


def _money(values: dict[str, str | None]) -> MoneyCheck | None:
    """A stored money check (None: the record was not priced; every field is empty)."""
    if not any(values.values()):
        return None
    parsed: dict[str, object] = {}
    for name, text in values.items():
        if name in _MONEY_NUMBERS:
            parsed[name] = _number(text)
        elif name in _MONEY_INTS:
            parsed[name] = int(text) if text else None
        elif name in ("detail", "preview_detail"):
            parsed[name] = text or ""
        else:
            parsed[name] = text
    return MoneyCheck.model_validate(parsed)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _number(text: str | None) -> int | float | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


@dataclass(frozen=True, slots=True)
class PeriodChoice:
    """What ``--period`` selects: a billing period exactly, or every period holding a UTC day."""

    text: str
    span: Period
    exact: bool
    """True for a billing period id: only that period. False for a date: every period (the UTC
    day itself, or a customer's billing period) that overlaps the day."""

    @classmethod
    def parse(cls, text: str) -> PeriodChoice:
        """Parse a billing period id (``20261101T000000Z/20261201T000000Z``) or a date
        (``2026-11-25``).

        Raises:
            ValueError: ``text`` is neither.
        """
        try:
            span = Period.parse(text.strip())
        except ValueError:
            msg = (
                f"{text!r} is not a period: give a billing period id such as "
                "20261101T000000Z/20261201T000000Z, or a date such as 2026-11-25"
            )
            raise ValueError(msg) from None
        if span.end <= span.start:
            msg = f"{text!r} is not a period: it ends before it starts"
            raise ValueError(msg)
        return cls(text=span.id, span=span, exact=span.kind == "billing")

    @property
    def days(self) -> tuple[str, str]:
        """The first and last UTC day the choice touches (for ``Ledger.rows``)."""
        return _day(self.span.start), _day(self.span.end - 1)

    def matches(self, period: str) -> bool:
        """Whether ledger period ``period`` is selected."""
        if self.exact:
            return period == self.span.id
        other = Period.parse(period)
        return other.start < self.span.end and other.end > self.span.start


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")


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
