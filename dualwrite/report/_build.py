"""``build_report``: the ledger, flags, divergence log and outbox read into a ``Report``.

Built to stay fast over 100,000 customers: the ledger rows come in pipelined batches, every stage is
resolved from one read of the flags, and the divergence log is read once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import redis.asyncio as aioredis

from dualwrite.config import ReportSettings
from dualwrite.engine import StageSource
from dualwrite.keys import KeySpace
from dualwrite.ledger import DivergenceRecord, Ledger, LedgerRow
from dualwrite.models import Stage
from dualwrite.outbox import Outbox
from dualwrite.redis_client import as_int, as_str, store_errors
from dualwrite.report._models import (
    CustomerReport,
    CustomerStatus,
    LegTotals,
    Report,
    UnmappedItems,
)
from dualwrite.report._readiness import ReadinessRule

__all__ = ["build_report", "read_backpressure", "read_unmapped"]

#: How many of a customer's latest divergent events its line carries.
RECENT_DIVERGENCES = 3
#: How much of the divergence log is read to find them.
DIVERGENCE_SCAN = 5_000

_FAILURE_PREFIXES = (
    ("legacy_refused_code:", "legacy:"),
    ("meter_refused_code:", "meter:"),
    ("legacy_failed_code:", "legacy:shadow:"),
    ("meter_failed_code:", "meter:shadow:"),
)


class BulkStageSource(Protocol):
    """A resolver that can resolve many customers at once (``StageResolver``)."""

    async def resolve_many(self, customers: Iterable[str]) -> dict[str, Stage]:
        """The stages of many customers."""
        ...


async def read_backpressure(redis: aioredis.Redis, keys: KeySpace) -> dict[str, int]:
    """The rate-limit counters every process adds to (``P:{rl}:backpressure``)."""
    async with store_errors("reading the back-pressure counters"):
        raw = await redis.hgetall(keys.backpressure)
    return {str(name): as_int(value) for name, value in sorted(raw.items())}


async def read_unmapped(redis: aioredis.Redis, keys: KeySpace) -> UnmappedItems:
    """The proxy's unmapped-usage counters (``P:{items}:unmapped``).

    Raises:
        StoreUnavailableError: Redis could not be reached.
    """
    async with store_errors("reading the unmapped-item counters"):
        raw = await redis.hgetall(keys.items_unmapped)
    counts = {str(as_str(item)): as_int(count) for item, count in raw.items()}
    top = dict(sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))[:10])
    return UnmappedItems(items=len(counts), requests=sum(counts.values()), top=top)


async def _stages(resolver: StageSource, customers: Sequence[str]) -> dict[str, Stage]:
    bulk = getattr(resolver, "resolve_many", None)
    if bulk is not None:
        stages: dict[str, Stage] = await bulk(customers)
        return stages
    return {customer: await resolver.resolve(customer) for customer in customers}


def _status(legacy: LegTotals, meter: LegTotals, divergent: int) -> CustomerStatus:
    if divergent or legacy.failed_events or meter.failed_events:
        return "diverged"
    if legacy.pending_events or meter.pending_events:
        return "pending"
    return "parity"


_TOTALS = ("events", "quantity", "translated_events", "divergent_events", "delayed_events")
_LEG_NAMES = tuple(LegTotals.model_fields)
# Every counter the report sums, and where its sum goes in one flat list.
_SLOTS: dict[str, int] = {
    name: index
    for index, name in enumerate(
        [f"legacy_{field}" for field in _LEG_NAMES]
        + [f"meter_{field}" for field in _LEG_NAMES]
        + list(_TOTALS)
        + [f"stage_{stage.value}_events" for stage in Stage]
    )
}
_LEGACY_AT, _METER_AT, _TOTALS_AT = 0, len(_LEG_NAMES), 2 * len(_LEG_NAMES)
_BY_PERIOD_STAGES = (Stage.SHADOW, Stage.PRIMARY)


def _failure_key(name: str) -> str | None:
    for prefix, label in _FAILURE_PREFIXES:
        if name.startswith(prefix):
            return label + name[len(prefix) :]
    return None


def _line(
    name: str,
    stage: Stage,
    rows: Sequence[LedgerRow],
    rule: ReadinessRule,
    recent: list[DivergenceRecord],
) -> CustomerReport:
    # One pass over every counter of every row (this runs for each of 100,000 customers).
    slots = _SLOTS
    sums = [0] * len(slots)
    failures: dict[str, int] = {}
    per_period: dict[str, list[int]] | None = {} if stage in _BY_PERIOD_STAGES else None
    for row in rows:
        period_sums = (
            None if per_period is None else per_period.setdefault(row.period, [0] * len(slots))
        )
        for counter, value in row.counters.items():
            index = slots.get(counter)
            if index is not None:
                sums[index] += value
                if period_sums is not None:
                    period_sums[index] += value
            elif value and "_code:" in counter:
                key = _failure_key(counter)
                if key is not None:
                    failures[key] = failures.get(key, 0) + value
    legacy = LegTotals(**dict(zip(_LEG_NAMES, sums[_LEGACY_AT:_METER_AT], strict=True)))
    meter = LegTotals(**dict(zip(_LEG_NAMES, sums[_METER_AT:_TOTALS_AT], strict=True)))
    events, quantity, translated, divergent, delayed = sums[_TOTALS_AT : _TOTALS_AT + len(_TOTALS)]
    both = legacy.expected_qty and meter.expected_qty
    larger = max(legacy.accepted_qty, meter.accepted_qty)
    difference_pct = (
        round((legacy.accepted_qty - meter.accepted_qty) * 100 / larger, 4)
        if both and larger
        else (0.0 if both else None)
    )
    if per_period is None:
        verdict = rule.verdict_by_period(stage, {})
    else:
        names = list(slots)
        verdict = rule.verdict_by_period(
            stage,
            {
                period: dict(zip(names, values, strict=True))
                for period, values in per_period.items()
            },
        )
    return CustomerReport(
        customer=name,
        stage=stage,
        event_names=sorted({row.event_name for row in rows}),
        periods=sorted({row.period for row in rows}),
        events=events,
        quantity=quantity,
        legacy=legacy,
        meter=meter,
        translated_events=translated,
        divergent_events=divergent,
        delayed_events=delayed,
        status=_status(legacy, meter, divergent),
        difference_pct=difference_pct,
        failures=dict(sorted(failures.items())),
        recent_divergences=recent,
        verdict=verdict,
    )


async def build_report(
    ledger: Ledger,
    resolver: StageSource,
    *,
    outbox: Outbox | None = None,
    since: str | None = None,
    until: str | None = None,
    customer: str | None = None,
    stage: Stage | None = None,
    only_divergent: bool = False,
    divergence_limit: int = 20,
    settings: ReportSettings | None = None,
    now: float | None = None,
) -> Report:
    """Read the ledger into a per-customer report.

    Args:
        since, until: UTC days (``YYYY-MM-DD``, inclusive): the periods overlapping them count.
        customer, stage, only_divergent: filters (stage: the customer's stage now).
        divergence_limit: how many of the latest divergent events the report lists.
        settings: the readiness rule (default: ``ReportSettings()``).
    """
    rule = ReadinessRule(settings or ReportSettings(), now=time.time() if now is None else now)
    rows = await ledger.rows(since=since, until=until, customer=customer)
    by_customer: dict[str, list[LedgerRow]] = {}
    for row in rows:
        by_customer.setdefault(row.customer, []).append(row)
    names = sorted(by_customer)
    stages = await _stages(resolver, names)
    log = await ledger.divergences(limit=max(divergence_limit, DIVERGENCE_SCAN), customer=customer)
    recent: dict[str, list[DivergenceRecord]] = {}
    for record in log:
        mine = recent.setdefault(record.customer, [])
        if len(mine) < RECENT_DIVERGENCES:
            mine.append(record)
    customers: list[CustomerReport] = []
    for name in names:
        current = stages[name]
        if stage is not None and current is not stage:
            continue
        line = _line(name, current, by_customer[name], rule, recent.get(name, []))
        if only_divergent and line.status != "diverged":
            continue
        customers.append(line)
    divergences = log[: max(divergence_limit, 0)]
    if stage is not None or only_divergent:
        shown = {line.customer for line in customers}
        divergences = [record for record in divergences if record.customer in shown]
    return Report(
        generated_at=time.time(),
        since=since,
        until=until,
        customers=customers,
        divergences=divergences,
        outbox=await outbox.depth() if outbox is not None else None,
        unmapped=await read_unmapped(ledger.redis, ledger.keys),
        backpressure=await read_backpressure(ledger.redis, ledger.keys),
        readiness_rule=rule.describe(),
    )
