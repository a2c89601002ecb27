"""``dualwrite backfill``: replay usage already on the legacy path as meter events, for a customer
entering ``shadow`` in the middle of a period.

What is replayed comes from ``_sources`` (usage record summaries, or an export file).

Meter events carry identifiers derived from the summary ids or the export's identifiers, so Stripe
refuses a resend, and a Redis marker (``P:{sN}:backfill:<identifier>``), set in the same script that
counts the event in the ledger, keeps a rerun from counting anything twice. Stripe takes meter
events up to 35 days back: older usage is refused here, before any call, and counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.keys import ShardKeys
from dualwrite.ledger import LedgerUpdate, ledger_script
from dualwrite.migrate._audit import OpsAudit
from dualwrite.migrate._export import BackfillInputError, read_export
from dualwrite.migrate._sources import METER_PAST_WINDOW, BackfillSources, PlannedEvent
from dualwrite.migrate._stripe import MigrationStripe
from dualwrite.models import Leg, UsageEvent, WriteResult
from dualwrite.rate_limits import WriteLimits
from dualwrite.reconcile import read_throttle
from dualwrite.redis_client import store_errors
from dualwrite.stripe_io import StripeReader

__all__ = [
    "METER_PAST_WINDOW",
    "BackfillEvent",
    "BackfillResult",
    "run_backfill",
]

MARKER_TTL = 40 * 86_400
"""How long a backfill marker lives (past the 35 days after which no resend is accepted anyway)."""
DUPLICATE = "An event already exists with identifier"
"""Stripe's refusal of a meter event identifier it has seen: an earlier run sent it."""
_RETRIES = 3

# KEYS and ARGV: the ledger block (``dualwrite.ledger``), then the marker (own key), its ttl and value
# (own arguments). Counts only when the marker is new.
_COUNT_ONCE = ledger_script(
    """
local ttl, value = unpack(ARGV, OWN_ARGS)
if not redis.call('SET', KEYS[OWN_KEYS], value, 'NX', 'EX', ttl) then return 0 end
ledger_update()
return 1
"""
)

Status = Literal["sent", "already", "would_send", "too_old", "nothing", "failed"]
Progress = Callable[[int, int], None]
"""Called with (done, total) after each event."""


class BackfillEvent(BaseModel):
    """One meter event of the backfill and what became of it."""

    model_config = ConfigDict(frozen=True)

    source: str
    """``summary sis_…`` or ``export line N``."""
    event_name: str
    subscription_item: str | None
    quantity: int
    timestamp: int
    identifier: str
    """The meter event's identifier (derived: the same on every run)."""
    status: Status
    note: str = ""


class BackfillResult(BaseModel):
    """What a backfill did (or, dry, would do)."""

    model_config = ConfigDict(frozen=True)

    customer: str
    source: Literal["summaries", "export"]
    dry_run: bool
    events: list[BackfillEvent]
    skipped_rows: int = 0
    """Export rows of other customers, or before ``since``."""
    audit_id: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)

    def count(self, status: Status) -> int:
        """How many events ended with ``status``."""
        return sum(1 for event in self.events if event.status == status)

    def quantity(self, status: Status) -> int:
        """Their total quantity."""
        return sum(event.quantity for event in self.events if event.status == status)


class _Backfill:
    """Sends and counts the events of one backfill run."""

    def __init__(self, settings: Settings, engine: DualWriteEngine, *, now: int):
        self.settings = settings
        self.engine = engine
        self.now = now
        self.stores = engine.stores
        self._count_once = self.stores.redis.register_script(_COUNT_ONCE)

    async def _period(self, event: UsageEvent) -> str:
        if self.settings.ledger.periods == "day" or event.subscription_item is None:
            return event.period
        return (await self.engine.periods.period_for(event)).id

    async def _write(self, event: UsageEvent) -> WriteResult:
        """The meter write, retried in place on retryable failures (rate limits included)."""
        wait = 0.2
        for attempt in range(_RETRIES + 1):
            result = await self.engine.writer.write(
                Leg.METER, event, max_wait=self.settings.limits.worker_max_wait
            )
            failure = result.failure
            if result.accepted or failure is None or not failure.retryable or attempt == _RETRIES:
                return result
            await anyio.sleep(max(wait, failure.retry_after or 0))
            wait *= 2
        return result  # pragma: no cover  (the loop always returns)

    async def _count(self, shard: ShardKeys, event: UsageEvent) -> bool:
        """Count a backfilled event in the ledger, unless an earlier run did."""
        update = LedgerUpdate(shard, event, await self._period(event))
        quantity = event.quantity
        for what in ("expected", "accepted", "backfilled"):
            update.add(f"meter_{what}_events").add(f"meter_{what}_qty", quantity)
        marker = shard.backfill_marker(event.meter_identifier)
        keys, args = update.block()
        own: list[str | int] = [MARKER_TTL, f"{self.now}:{quantity}"]
        async with store_errors("counting a backfilled event"):
            done = await self._count_once(keys=[*keys, marker], args=[*args, *own])
        return bool(done)

    async def send(self, planned: PlannedEvent, *, dry_run: bool) -> BackfillEvent:
        """Send (or, dry, check) one event and say what became of it."""
        event = planned.event
        shard = self.stores.keys.for_customer(event.customer)

        def outcome(status: Status, note: str = planned.note) -> BackfillEvent:
            return BackfillEvent(
                source=planned.source,
                event_name=event.event_name,
                subscription_item=event.subscription_item,
                quantity=event.quantity,
                timestamp=event.timestamp,
                identifier=event.meter_identifier,
                status=status,
                note=note,
            )

        if planned.too_old:
            return outcome("too_old", "older than the 35 days Stripe takes meter events for")
        async with store_errors("reading the backfill markers"):
            seen = await self.stores.redis.exists(shard.backfill_marker(event.meter_identifier))
        if seen:
            return outcome("already", "counted by an earlier run")
        if event.quantity == 0:
            return outcome("nothing", planned.note or "nothing to replay")
        if dry_run:
            return outcome("would_send")
        result = await self._write(event)
        failure = result.failure
        duplicate = failure is not None and failure.message.startswith(DUPLICATE)
        if not result.accepted and not duplicate:
            code = (failure.code or failure.type) if failure else "unknown"
            return outcome("failed", f"{result.http_status} {code}: {failure and failure.message}")
        counted = await self._count(shard, event)
        if not duplicate:
            return outcome("sent" if counted else "already")
        # Stripe had it: a run that died between the write and the count; the count is made now.
        return outcome(
            "already", "sent by an interrupted run" + ("; counted now" if counted else "")
        )


async def run_backfill(
    settings: Settings,
    customer: str,
    *,
    since: int | None = None,
    export: Path | None = None,
    dry_run: bool = False,
    actor: str = "dualwrite",
    reason: str = "",
    progress: Progress | None = None,
) -> BackfillResult:
    """Replay a customer's legacy usage into meter events, each counted once in the ledger.

    Raises:
        BackfillInputError: bad input (unknown customer, a bad export row, an unmapped item).
        ConfigError: no Stripe key is set.
        StoreUnavailableError: Redis could not be reached.
    """
    api_key = settings.stripe_api_key_value()
    if not api_key:
        msg = "backfill writes to Stripe: set STRIPE_API_KEY"
        raise BackfillInputError(msg)
    rows = read_export(export) if export is not None else None
    async with MigrationStripe(settings.stripe, api_key=api_key) as stripe:
        if not await stripe.customer_exists(customer):
            msg = f"--customer {customer}: no such customer on this Stripe account"
            raise BackfillInputError(msg)
        # A customer on a Stripe test clock: Stripe judges its usage, open period and the meter's
        # 35 days by the clock's frozen time, so the run's "now" is that time.
        clock_now = await stripe.customer_now(customer)
    engine = DualWriteEngine.from_settings(settings)
    limits = WriteLimits(
        engine.stores.redis,
        engine.stores.keys,
        settings.limits,
        reads_per_second=settings.reconcile.reads_per_second,
    )
    reader = StripeReader(settings.stripe, api_key=api_key, throttle=read_throttle(limits))
    try:
        now = int(time.time()) if clock_now is None else clock_now
        job = _Backfill(settings, engine, now=now)
        sources = BackfillSources(settings, reader, now=now)
        skipped = 0
        if rows is None:
            planned = await sources.from_summaries(customer, since)
        else:
            planned, skipped = await sources.from_export(customer, rows, since)
        events: list[BackfillEvent] = []
        for planned_event in planned:
            events.append(await job.send(planned_event, dry_run=dry_run))
            if progress is not None:
                progress(len(events), len(planned))
        result = BackfillResult(
            customer=customer,
            source="summaries" if rows is None else "export",
            dry_run=dry_run,
            events=events,
            skipped_rows=skipped,
        )
        counts = {status: result.count(status) for status in _STATUSES}
        result = result.model_copy(update={"counts": counts})
        if not dry_run:
            details: dict[str, Any] = {
                "customer": customer,
                "source": result.source,
                "export": export.name if export else None,
                "since": since,
                **{status: counts[status] for status in _STATUSES},
                "sent_qty": result.quantity("sent"),
                "too_old_qty": result.quantity("too_old"),
                "reason": reason,
            }
            audit_id = await OpsAudit(engine.stores.redis, engine.stores.keys).record(
                "backfill", actor=actor, details=details
            )
            result = result.model_copy(update={"audit_id": audit_id})
        return result
    finally:
        await reader.aclose()
        await engine.aclose()


_STATUSES: tuple[Status, ...] = ("sent", "already", "would_send", "too_old", "nothing", "failed")
