"""``build_report``: the ledger, flags, divergence log and outbox read into a ``Report``.

Built to stay fast over 100,000 customers: the ledger rows come in pipelined batches, every stage is
resolved from one read of the flags, and the divergence log is read once.
"""

from __future__ import annotations

import operator
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import compress, count
from typing import Protocol

import redis.asyncio as aioredis

from dualwrite.config import ReportSettings
from dualwrite.durability import RECLEAR_HINT, DataLoss, read_durability, read_loss
from dualwrite.engine import StageSource
from dualwrite.idempotency import IdempotencyStore
from dualwrite.keys import KeySpace
from dualwrite.ledger import (
    DivergenceRecord,
    Ledger,
    RolledRow,
    collector_paused,
    period_score,
    read_customer_rows,
)
from dualwrite.models import Stage
from dualwrite.outbox import Outbox
from dualwrite.reconcile import read_reconciliation, read_reconciliation_fields
from dualwrite.redis_client import as_int, as_str, store_errors
from dualwrite.report._drift import customer_drifts
from dualwrite.report._lines import (
    AT,
    COUNTERS,
    CUSTOMER,
    DIFFERENCE_PCT,
    DRIFT,
    STATUS,
    VERDICT,
    CustomerLines,
    RawLine,
    counters_of,
    line_model,
    parse_columns,
    sum_counters,
)
from dualwrite.report._models import (
    CustomerDrift,
    CustomerReport,
    CustomerStatus,
    Report,
    UnmappedItems,
    Verdict,
    legacy_held,
    trusted,
)
from dualwrite.report._readiness import ReadinessRule

__all__ = [
    "build_lines",
    "build_report",
    "read_backpressure",
    "read_unfinished",
    "read_unmapped",
]

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


def _unverified(line: RawLine, loss: DataLoss) -> RawLine:
    """A line once Redis lost data: ``parity`` becomes ``unverified`` and nobody is ready."""
    status, verdict = line[STATUS], line[VERDICT]
    if status != "parity" and not verdict.ready:
        return line
    since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(loss.since))
    verdict = Verdict(
        ready=False,
        next_stage=verdict.next_stage,
        reason=f"ledger incomplete since {since} (Redis data lost): {RECLEAR_HINT}",
    )
    status = "unverified" if status == "parity" else status
    return (*line[:STATUS], status, *line[DIFFERENCE_PCT:VERDICT], verdict, line[DRIFT])


async def _stages(resolver: StageSource, customers: Sequence[str]) -> dict[str, Stage]:
    bulk = getattr(resolver, "resolve_many", None)
    if bulk is not None:
        stages: dict[str, Stage] = await bulk(customers)
        return stages
    return {customer: await resolver.resolve(customer) for customer in customers}


async def read_unfinished(
    ledger: Ledger, store: IdempotencyStore | None, customer: str | None
) -> dict[str, Counter[str]]:
    """Per customer, the meter event names of its events claimed and not yet committed (in flight,
    or waiting for recovery: ``dualwrite.recovery``)."""
    found: dict[str, Counter[str]] = {}
    if store is None:
        return found
    keys = ledger.keys
    shards = [keys.for_customer(customer)] if customer else keys.all_shards()
    for shard in shards:
        for member in await store.unresolved(shard):
            parts = member.split("|", 2)
            if len(parts) == 3 and customer in (None, parts[1]):
                found.setdefault(parts[1], Counter())[parts[2]] += 1
    return found


_LEGACY_EXPECTED, _METER_EXPECTED = AT["legacy_expected_qty"], AT["meter_expected_qty"]
_LEGACY_ACCEPTED, _LEGACY_RETIRED = AT["legacy_accepted_qty"], AT["legacy_retired_qty"]
_METER_ACCEPTED = AT["meter_accepted_qty"]
_DIVERGENT = AT["divergent_events"]
_LEGACY_FAILED, _METER_FAILED = AT["legacy_failed_events"], AT["meter_failed_events"]
_LE, _LA, _LF, _LR, _LL = (
    AT[f"legacy_{name}_events"]
    for name in ("expected", "accepted", "failed", "retired", "late_refused")
)
_ME, _MA, _MF, _MR, _ML = (
    AT[f"meter_{name}_events"]
    for name in ("expected", "accepted", "failed", "retired", "late_refused")
)
_BY_PERIOD_STAGES = (Stage.SHADOW, Stage.PRIMARY)
_ZERO = (0,) * len(COUNTERS)
Row = tuple[str, str, tuple[int, ...], dict[str, int] | None]
"""A ledger row as the report holds it: period, meter event name, counters (``COUNTERS``), any
other counters by name (failure codes)."""
Held = Row | list[Row]
"""A customer's rows as the report holds them: its only row as itself (most customers: no list
for each of a million), or a list."""
#: Row copies parsed per ``json.loads``: the raw replies are let go chunk by chunk.
_PARSE_CHUNK = 20_000
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_THIRD, _FOURTH = operator.itemgetter(2), operator.itemgetter(3)
_BY_CUSTOMER = operator.itemgetter(CUSTOMER)


def _failure_key(name: str) -> str | None:
    for prefix, label in _FAILURE_PREFIXES:
        if name.startswith(prefix):
            return label + name[len(prefix) :]
    return None


def _failures(rows: Sequence[Row]) -> dict[str, int] | None:
    """Failures by leg and Stripe code, from the rows' other counters (None: none)."""
    sums: dict[str, int] = {}
    for *_, others in rows:
        for name, value in (others or {}).items():
            sums[name] = sums.get(name, 0) + value
    failures: dict[str, int] = {}
    for name, value in sums.items():
        key = _failure_key(name) if "_code:" in name else None
        if value and key is not None:
            failures[key] = failures.get(key, 0) + value
    return dict(sorted(failures.items())) or None


def _by_period(rows: Sequence[Row]) -> dict[str, tuple[int, ...]]:
    periods: dict[str, list[tuple[int, ...]]] = {}
    for period, _, values, _ in rows:
        periods.setdefault(period, []).append(values)
    return {period: sum_counters(values) for period, values in periods.items()}


def _group(found: list[RolledRow], into: dict[str, Held]) -> None:
    """The rollup row copies ``found`` parsed and held by customer in ``into`` (``Held``);
    ``found`` is emptied on the way (from its end, a chunk at a time), so its strings go as their
    rows come."""
    with collector_paused():
        while found:
            chunk = found[-_PARSE_CHUNK:]
            del found[-_PARSE_CHUNK:]
            members = list(map(_FIRST, chunk))
            values, others = parse_columns(list(map(_SECOND, chunk)))
            del chunk
            parts = "|".join(members).split("|")
            if len(parts) != 3 * len(members):  # a meter event name holding "|"
                parts = [part for member in members for part in member.split("|", 2)]
            # Periods and event names repeat across customers: one string each.
            periods = map(sys.intern, parts[0::3])
            event_names = map(sys.intern, parts[2::3])
            rows = list(zip(periods, event_names, values, others, strict=True))
            customers = parts[1::3]
            # Each customer's first row is held as itself, in one C loop; the few rows whose
            # customer already held one (``setdefault`` gave back another) join it in a list.
            held = list(map(into.setdefault, customers, rows))
            for at in compress(count(), map(operator.is_not, held, rows)):
                before = into[customers[at]]
                if isinstance(before, list):
                    before.append(rows[at])
                else:
                    into[customers[at]] = [before, rows[at]]


def _line(
    name: str,
    stage: Stage,
    kept: Held,
    rule: ReadinessRule,
    recent: list[DivergenceRecord] | None,
    drift: CustomerDrift | None,
    unfinished: Counter[str] | None = None,
) -> RawLine:
    # This runs for each of a million customers: counters stay tuples, summed position by
    # position, and the line is a tuple too (``CustomerLines`` makes its models when read).
    if isinstance(kept, list):
        rows = kept
        one = rows[0] if len(rows) == 1 else None
    else:
        rows, one = [], kept
    if one is not None and not unfinished:  # most customers: one event name, one period
        period, event_name, values, others = one
        periods: tuple[str, ...] = _ONE.get(period) or _one(period)
        event_names: tuple[str, ...] = _ONE.get(event_name) or _one(event_name)
        failures = _failures((one,)) if others else None
        held = values[_LEGACY_ACCEPTED] + values[_LEGACY_RETIRED]  # legacy_held
        meter_held = values[_METER_ACCEPTED]
        verdict = rule.verdict_of_row(stage, period, values)
        unfinished_total = 0
    else:
        if one is not None:
            rows = [one]  # one row, and unfinished events
        counters = list(map(_THIRD, rows))
        values = sum_counters(counters) if rows else _ZERO
        periods = tuple(sorted(set(map(_FIRST, rows))))
        names = set(map(_SECOND, rows))
        if unfinished:
            names.update(unfinished)
        event_names = tuple(sorted(names))
        failures = _failures(rows) if any(map(_FOURTH, rows)) else None
        by_period = (
            dict(zip(map(_FIRST, rows), counters, strict=True))
            if len(periods) == len(rows)
            else _by_period(rows)
        )
        held = legacy_held(values[_LEGACY_ACCEPTED], values[_LEGACY_RETIRED])
        meter_held = values[_METER_ACCEPTED]
        if values[_LEGACY_EXPECTED] and values[_METER_EXPECTED]:
            # Only periods where both legs were written compare: a period at ``meter`` (no
            # legacy write) beside earlier ``primary`` ones is no difference between the legs.
            dual = [one for one in counters if one[_LEGACY_EXPECTED] and one[_METER_EXPECTED]]
            if len(dual) < len(rows):
                dual_sums = sum_counters(dual) if dual else _ZERO
                held = legacy_held(dual_sums[_LEGACY_ACCEPTED], dual_sums[_LEGACY_RETIRED])
                meter_held = dual_sums[_METER_ACCEPTED]
        verdict = rule.verdict_of_counters(stage, by_period)
        unfinished_total = sum(unfinished.values()) if unfinished else 0
    difference_pct: float | None = None
    if values[_LEGACY_EXPECTED] and values[_METER_EXPECTED]:
        if held == meter_held and held >= 0:  # what the division gives, without it
            difference_pct = 0.0
        else:
            larger = held if held > meter_held else meter_held
            difference_pct = round((held - meter_held) * 100 / larger, 4)
    if drift is not None:
        verdict = rule.with_money(verdict, drift)
    # The status: ``diverged`` on any divergent or failed event; ``pending`` while an event is
    # unfinished or a leg's expected events are not all settled (accepted, failed for good,
    # retired or refused late); else ``parity``.
    status: CustomerStatus
    if values[_DIVERGENT] or values[_LEGACY_FAILED] or values[_METER_FAILED]:
        status = "diverged"
    elif (
        unfinished_total
        or values[_LE] != values[_LA] + values[_LF] + values[_LR] + values[_LL]
        or values[_ME] != values[_MA] + values[_MF] + values[_MR] + values[_ML]
    ):
        status = "pending"
    else:
        status = "parity"
    return (
        name,
        stage,
        event_names,
        periods,
        values,
        unfinished_total,
        status,
        difference_pct,
        failures,
        recent or None,
        verdict,
        drift,
    )


_ONE: dict[str, tuple[str]] = {}


def _one(text: str) -> tuple[str]:
    """``(text,)``, one tuple for all the lines naming the same single period or event name."""
    one = _ONE.get(text)
    if one is None:
        if len(_ONE) > 100_000:
            _ONE.clear()
        one = _ONE[text] = (text,)
    return one


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
    claims: IdempotencyStore | None = None,
) -> Report:
    """Read the ledger into a per-customer report.

    Args:
        since, until: UTC days (``YYYY-MM-DD``, inclusive): the periods overlapping them count.
        customer, stage, only_divergent: filters (stage: the customer's stage now).
        divergence_limit: how many of the latest divergent events the report lists.
        settings: the readiness rule (default: ``ReportSettings()``).
        claims: where events claimed and not yet committed are found (a customer with one is
            ``pending``, never ``parity``); default: the ledger's Redis.
    """
    rule = ReadinessRule(settings or ReportSettings(), now=time.time() if now is None else now)
    by_customer: dict[str, Held] = {}
    if customer is None:
        _group(await ledger.rolled(since=since, until=until), by_customer)
        recon = await read_reconciliation_fields(
            ledger.redis, ledger.keys, since=since, until=until
        )
    else:
        listed: dict[str, list[Row]] = {}
        for row in await ledger.rows(since=since, until=until, customer=customer):
            listed.setdefault(row.customer, []).append(
                (row.period, row.event_name, *counters_of(row.counters))
            )
        by_customer.update(listed)
        records = await read_reconciliation(
            ledger.redis, ledger.keys, since=since, until=until, customer=customer
        )
        recon = [record.to_fields() for record in records]
    drifts = customer_drifts(recon)
    if claims is None:
        claims = IdempotencyStore(ledger.redis, ttl_seconds=1, lease_seconds=1)
    unfinished = await read_unfinished(ledger, claims, customer)
    for name in unfinished:
        by_customer.setdefault(name, [])
    stages = await _stages(resolver, list(by_customer))
    log = await ledger.divergences(limit=max(divergence_limit, DIVERGENCE_SCAN), customer=customer)
    recent: dict[str, list[DivergenceRecord]] = {}
    for record in log:
        mine = recent.setdefault(record.customer, [])
        if len(mine) < RECENT_DIVERGENCES:
            mine.append(record)
    loss = await read_loss(ledger.redis, ledger.keys)
    customers: list[RawLine] = []
    with collector_paused():
        # The lines are made in the order the rows were read, and so laid out in memory (from the
        # last, each customer's rows let go as its line is made), then sorted by customer: over a
        # million customers, visiting them in name order cost a cache miss at every step.
        while by_customer:
            name, rows = by_customer.popitem()
            current = stages[name]
            if stage is not None and current is not stage:
                continue
            line = _line(
                name,
                current,
                rows,
                rule,
                recent.get(name) if recent else None,
                drifts.get(name) if drifts else None,
                unfinished.get(name) if unfinished else None,
            )
            if only_divergent and line[STATUS] != "diverged":
                continue
            customers.append(line if loss is None else _unverified(line, loss))
        del stages
        customers.sort(key=_BY_CUSTOMER)
    divergences = log[: max(divergence_limit, 0)]
    if stage is not None or only_divergent:
        shown = {line[CUSTOMER] for line in customers}
        divergences = [record for record in divergences if record.customer in shown]
    # Every value below is one the report computed or read through its own models: built
    # without validation (``trusted``), which would otherwise make every line's models at once.
    return trusted(
        Report,
        {
            "generated_at": time.time(),
            "since": since,
            "until": until,
            "customers": CustomerLines(customers),
            "divergences": divergences,
            "outbox": await outbox.depth() if outbox is not None else None,
            "unmapped": await read_unmapped(ledger.redis, ledger.keys),
            "backpressure": await read_backpressure(ledger.redis, ledger.keys),
            "readiness_rule": rule.describe(),
            "redis_persistence": (await read_durability(ledger.redis)).persistence,
            "ledger_incomplete_since": loss.since if loss is not None else None,
        },
    )


async def build_lines(
    ledger: Ledger,
    resolver: StageSource,
    customers: Iterable[str],
    *,
    since: str | None = None,
    until: str | None = None,
    settings: ReportSettings | None = None,
    now: float | None = None,
    claims: IdempotencyStore | None = None,
) -> list[CustomerReport]:
    """The report's lines of ``customers`` only, read at a cost in proportion to their ledger rows
    (``dualwrite.rollups.read_customer_rows``), not to the whole ledger's: what the guard judges
    between full passes.

    Each line is the one ``build_report`` would give the customer (same totals, status,
    difference and verdict), except that it carries no excerpt of the divergence log
    (``recent_divergences`` is empty) and no reconciliation drift. A customer with no row in the
    window and no unfinished event has no line.
    """
    rule = ReadinessRule(settings or ReportSettings(), now=time.time() if now is None else now)
    low = period_score(since) if since else None
    high = period_score(until) if until else None
    by_shard: dict[int, list[str]] = {}
    for customer in sorted(set(customers)):
        by_shard.setdefault(ledger.keys.shard_of(customer), []).append(customer)
    by_customer: dict[str, Held] = {}
    async with store_errors("reading the ledger"):
        for index, names in sorted(by_shard.items()):
            found = await read_customer_rows(
                ledger.redis, ledger.keys.shard(index), names, low=low, high=high
            )
            _group(found, by_customer)
    if claims is None:
        claims = IdempotencyStore(ledger.redis, ttl_seconds=1, lease_seconds=1)
    wanted = {customer for names in by_shard.values() for customer in names}
    unfinished: dict[str, Counter[str]] = {}
    for index in sorted(by_shard):
        for member in await claims.unresolved(ledger.keys.shard(index)):
            parts = member.split("|", 2)
            if len(parts) == 3 and parts[1] in wanted:
                unfinished.setdefault(parts[1], Counter())[parts[2]] += 1
    for name in unfinished:
        by_customer.setdefault(name, [])
    names = sorted(by_customer)
    stages = await _stages(resolver, names)
    loss = await read_loss(ledger.redis, ledger.keys)
    lines: list[CustomerReport] = []
    for name in names:
        line = _line(name, stages[name], by_customer[name], rule, None, None, unfinished.get(name))
        lines.append(line_model(line if loss is None else _unverified(line, loss)))
    return lines
