"""The divergence report: per customer, what each leg holds against what it should hold.

``build_report()`` reads the ledger, the divergence log and the outbox into a ``Report`` (a pydantic
model, so ``--json`` is its JSON); ``render_table()`` draws it for a terminal with rich.

A customer's status:

* ``parity``: every leg holds exactly what it should (for ``shadow`` and ``primary`` customers that
  means equal totals on both legs);
* ``pending``: shadow writes are still in the outbox (waiting or retrying);
* ``diverged``: a shadow write was refused for good or expired, so the legs disagree; the divergence
  log says which events and why.

Usage the proxy forwarded without dual-writing it (its subscription item maps to no meter) belongs
to no customer line: ``Report.unmapped`` counts it, per item.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Group
from rich.table import Table
from rich.text import Text

from dualwrite.engine import StageSource
from dualwrite.keys import KeySpace
from dualwrite.ledger import DivergenceRecord, Ledger, LedgerRow
from dualwrite.models import Stage
from dualwrite.outbox import Outbox, OutboxDepth
from dualwrite.redis_client import as_int, as_str, store_errors

__all__ = [
    "CustomerReport",
    "LegTotals",
    "Report",
    "UnmappedItems",
    "build_report",
    "read_backpressure",
    "read_unmapped",
    "render_table",
]

CustomerStatus = Literal["parity", "pending", "diverged"]


class LegTotals(BaseModel):
    """One leg's totals for a customer."""

    model_config = ConfigDict(frozen=True)

    expected_events: int = 0
    expected_qty: int = 0
    accepted_events: int = 0
    accepted_qty: int = 0
    failed_events: int = 0
    failed_qty: int = 0
    retired_events: int = 0
    retired_qty: int = 0
    refused_events: int = 0
    """Authoritative refusals returned to callers (not divergence)."""

    @property
    def pending_qty(self) -> int:
        """Quantity expected on this leg and not settled yet."""
        return self.expected_qty - self.accepted_qty - self.failed_qty - self.retired_qty

    @property
    def pending_events(self) -> int:
        """Events expected on this leg and not settled yet."""
        return (
            self.expected_events - self.accepted_events - self.failed_events - self.retired_events
        )

    @classmethod
    def from_rows(cls, leg: str, rows: Iterable[LedgerRow]) -> LegTotals:
        """Sum one leg's counters over ledger rows."""
        sums = dict.fromkeys(cls.model_fields, 0)
        for row in rows:
            for name in sums:
                sums[name] += row[f"{leg}_{name}"]
        return cls(**sums)


class CustomerReport(BaseModel):
    """One customer's line in the report."""

    model_config = ConfigDict(frozen=True)

    customer: str
    stage: Stage
    event_names: list[str]
    periods: list[str]
    events: int
    quantity: int
    legacy: LegTotals
    meter: LegTotals
    translated_events: int
    divergent_events: int
    status: CustomerStatus

    @property
    def difference(self) -> int:
        """Legacy total minus meter total (accepted quantities)."""
        return self.legacy.accepted_qty - self.meter.accepted_qty


class UnmappedItems(BaseModel):
    """Usage the proxy forwarded to the legacy path only, because its item maps to no meter."""

    model_config = ConfigDict(frozen=True)

    items: int = 0
    """Distinct subscription items."""
    requests: int = 0
    """Usage-record requests forwarded for them."""
    top: dict[str, int] = Field(default_factory=dict)
    """The items with the most requests (at most ten)."""


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


class Report(BaseModel):
    """The whole report."""

    model_config = ConfigDict(frozen=True)

    generated_at: float
    since: str | None
    until: str | None
    customers: list[CustomerReport]
    divergences: list[DivergenceRecord]
    outbox: OutboxDepth | None
    unmapped: UnmappedItems = Field(default_factory=UnmappedItems)
    backpressure: dict[str, int] = Field(default_factory=dict)
    """Rate-limit waits and writes held back (then retried), per limit: ``<limit>_waits``,
    ``<limit>_waited_ms``, ``<limit>_held_back``."""
    """Usage the proxy forwarded without dual-writing it (all customers, all periods)."""

    @property
    def divergent_customers(self) -> int:
        """Customers with at least one divergent event."""
        return sum(1 for customer in self.customers if customer.status == "diverged")


def _status(legacy: LegTotals, meter: LegTotals, divergent: int) -> CustomerStatus:
    if divergent or legacy.failed_events or meter.failed_events:
        return "diverged"
    if legacy.pending_events or meter.pending_events:
        return "pending"
    return "parity"


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
) -> Report:
    """Read the ledger into a per-customer report (periods are ``YYYY-MM-DD``, inclusive)."""
    rows = await ledger.rows(since=since, until=until, customer=customer)
    by_customer: dict[str, list[LedgerRow]] = {}
    for row in rows:
        by_customer.setdefault(row.customer, []).append(row)
    customers: list[CustomerReport] = []
    for name in sorted(by_customer):
        mine = by_customer[name]
        current = await resolver.resolve(name)
        if stage is not None and current is not stage:
            continue
        legacy = LegTotals.from_rows("legacy", mine)
        meter = LegTotals.from_rows("meter", mine)
        divergent = sum(row["divergent_events"] for row in mine)
        status = _status(legacy, meter, divergent)
        if only_divergent and status != "diverged":
            continue
        customers.append(
            CustomerReport(
                customer=name,
                stage=current,
                event_names=sorted({row.event_name for row in mine}),
                periods=sorted({row.period for row in mine}),
                events=sum(row["events"] for row in mine),
                quantity=sum(row["quantity"] for row in mine),
                legacy=legacy,
                meter=meter,
                translated_events=sum(row["translated_events"] for row in mine),
                divergent_events=divergent,
                status=status,
            )
        )
    # A limit of 0 asks for no records (Redis refuses XREVRANGE ... COUNT 0).
    divergences = (
        await ledger.divergences(limit=divergence_limit, customer=customer)
        if divergence_limit > 0
        else []
    )
    if stage is not None or only_divergent:
        shown = {c.customer for c in customers}
        divergences = [record for record in divergences if record.customer in shown]
    return Report(
        generated_at=time.time(),
        since=since,
        until=until,
        customers=customers,
        divergences=divergences,
        outbox=await outbox.depth() if outbox is not None else None,
        # The ledger's own connection and key space: the counters live beside it in Redis.
        unmapped=await read_unmapped(ledger.redis, ledger.keys),
        backpressure=await read_backpressure(ledger.redis, ledger.keys),
    )


_STATUS_STYLE = {"parity": "green", "pending": "yellow", "diverged": "bold red"}


def render_table(report: Report) -> Group:
    """The report as rich renderables: the customer table, then the latest divergent events."""
    table = Table(title="dualwrite: usage per customer, legacy vs meter", title_justify="left")
    for column, justify in (
        ("customer", "left"),
        ("stage", "left"),
        ("events", "right"),
        ("quantity", "right"),
        ("legacy", "right"),
        ("meter", "right"),
        ("difference", "right"),
        ("pending", "right"),
        ("failed (legacy/meter)", "right"),
        ("divergent", "right"),
        ("status", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in report.customers:
        pending = row.legacy.pending_qty + row.meter.pending_qty
        table.add_row(
            row.customer,
            row.stage.value,
            f"{row.events:,}",
            f"{row.quantity:,}",
            f"{row.legacy.accepted_qty:,}",
            f"{row.meter.accepted_qty:,}",
            f"{row.difference:+,}" if row.difference else "0",
            f"{pending:,}" if pending else "",
            f"{row.legacy.failed_events}/{row.meter.failed_events}",
            str(row.divergent_events) if row.divergent_events else "",
            Text(row.status, style=_STATUS_STYLE[row.status]),
        )
    parts: list[Table | Text] = [table]
    if report.outbox is not None:
        depth = report.outbox
        parts.append(
            Text(
                f"outbox: {depth.ready} queued, {depth.scheduled} waiting to retry, "
                f"{depth.dead} dead letters"
            )
        )
    if report.backpressure:
        waits = ", ".join(f"{name} {count:,}" for name, count in report.backpressure.items())
        parts.append(Text(f"rate limits (all processes): {waits}"))
    if report.unmapped.requests:
        unmapped = report.unmapped
        parts.append(
            Text(
                f"unmapped: {unmapped.requests:,} usage requests for {unmapped.items:,} subscription "
                "items were forwarded to legacy only (no [[meters]] mapping): "
                + ", ".join(f"{item} ({count:,})" for item, count in unmapped.top.items()),
                style="yellow",
            )
        )
    if report.divergences:
        log = Table(title="latest divergent events", title_justify="left")
        for column in ("customer", "kind", "identifier", "quantity", "legacy", "meter", "note"):
            log.add_column(column)
        for record in report.divergences:
            log.add_row(
                record.customer,
                record.kind,
                record.identifier,
                str(record.quantity),
                _leg_cell(record.legacy.status, record.legacy.stripe_id, record.legacy.error),
                _leg_cell(record.meter.status, record.meter.stripe_id, record.meter.error),
                record.note,
            )
        parts.append(log)
    return Group(*parts)


def _leg_cell(status: str, stripe_id: str | None, error: str | None) -> str:
    detail = stripe_id or error or ""
    return f"{status} {detail}".strip()
