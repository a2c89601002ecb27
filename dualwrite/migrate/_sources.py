"""What ``dualwrite backfill`` replays, read from Stripe's usage record summaries or an export.

* **usage record summaries**: for each legacy metered item of the customer, the totals of its
  periods (the open one; with ``since``, back to the period holding it). Items on one meter and
  period make one meter event. For a ``sum`` meter its value is the legacy total less what the meter
  already holds for the customer in that period (the events dualwrite shadowed since the customer
  entered ``shadow``); a ``last`` meter gets the legacy value.
* **an export file**: one meter event per row of the customer.

Identifiers are derived from the summary ids or the export's identifiers: the same on every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from dualwrite.config import Settings
from dualwrite.migrate._export import BackfillInputError, ExportRow
from dualwrite.models import UsageEvent
from dualwrite.stripe_io import StripeReader, SubscriptionItemInfo

__all__ = ["METER_PAST_WINDOW", "BackfillSources", "PlannedEvent"]

METER_PAST_WINDOW = 35 * 86_400
"""How far back Stripe takes a meter event's timestamp."""
_MARGIN = 300
"""Usage this close to the 35-day edge is refused too: it could cross it while being sent."""


@dataclass(frozen=True, slots=True)
class PlannedEvent:
    """One meter event to replay, where it comes from, and whether it is too old for a meter."""

    source: str
    event: UsageEvent
    too_old: bool
    note: str = ""


def _derived(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


class BackfillSources:
    """Reads what a backfill replays: usage record summaries, or an export's rows.

    Args:
        settings: the ``[[meters]]`` and ``[items]`` mappings.
        reader: Stripe reads (items, summaries, meters, meter totals).
        now: the run's "now" (Unix seconds).
    """

    def __init__(self, settings: Settings, reader: StripeReader, *, now: int):
        self.settings = settings
        self.reader = reader
        self.now = now

    def event_name_of(self, item: SubscriptionItemInfo) -> str | None:
        """The meter event name a legacy item's usage belongs to (config), else None."""
        known = self.settings.items.get(item.item)
        if known is not None:
            return known.event_name
        for meter in self.settings.meters:
            if (item.price and item.price in meter.legacy_prices) or (
                item.lookup_key and item.lookup_key in meter.lookup_keys
            ):
                return meter.event_name
        return None

    def too_old(self, timestamp: int) -> bool:
        """Whether Stripe would refuse a meter event at ``timestamp`` as too far in the past."""
        return timestamp < self.now - METER_PAST_WINDOW + _MARGIN

    async def from_summaries(self, customer: str, since: int | None) -> list[PlannedEvent]:
        """One event per meter and period, from the legacy items' usage record summaries."""
        items = [item for item in await self.reader.customer_items(customer) if item.legacy_metered]
        if not items:
            msg = f"--customer {customer}: no subscription item on a legacy metered price to replay"
            raise BackfillInputError(msg)
        groups: dict[tuple[str, int, int], list[tuple[str, str, int]]] = {}
        for item in items:
            name = self.event_name_of(item)
            if name is None:
                msg = (
                    f"subscription item {item.item} (price {item.price}) maps to no meter; fix: "
                    "run `dualwrite meters apply`, or list the price in a [[meters]] table"
                )
                raise BackfillInputError(msg)
            async for summary in self.reader.usage_summaries(item.item):
                if summary.start is None or summary.end is None:
                    continue
                key = (name, summary.start, summary.end)
                groups.setdefault(key, []).append((summary.id, item.item, summary.total_usage))
                if since is None or summary.start <= since:
                    break  # newest first: the open period, or back to the one holding ``since``
        meters = {meter.event_name: meter for meter in await self.reader.meters()}
        planned: list[PlannedEvent] = []
        for (name, start, end), parts in sorted(groups.items()):
            meter = meters.get(name)
            if meter is None or meter.status != "active":
                msg = f"no active meter has the event name {name!r}; fix: `dualwrite meters apply`"
                raise BackfillInputError(msg)
            legacy = sum(total for _, _, total in parts)
            # Inside the period: its end second is the legacy period's, a meter's next period's.
            timestamp = min(end - 1, self.now)
            held = 0
            if meter.formula == "sum" and not self.too_old(timestamp):
                # Shadowed events already on the meter count on both sides: send the rest only.
                # Stripe's summaries take minute-aligned windows: round the period outwards.
                stop = timestamp + 1 + (-(timestamp + 1) % 60)
                held = int(
                    await self.reader.meter_total(
                        meter.id, customer=customer, start=start - start % 60, end=stop
                    )
                )
            ids = sorted(summary_id for summary_id, _, _ in parts)
            event = UsageEvent(
                identifier=f"backfill:summary:{_derived(customer, name, *ids)}",
                customer=customer,
                event_name=name,
                subscription_item=parts[0][1] if len(parts) == 1 else None,
                quantity=max(legacy - held, 0),
                timestamp=timestamp,
            )
            note = f"legacy {legacy}, already on the meter {held}" if held else ""
            planned.append(
                PlannedEvent(f"summary {' '.join(ids)}", event, self.too_old(timestamp), note)
            )
        return planned

    async def from_export(
        self, customer: str, rows: list[ExportRow], since: int | None
    ) -> tuple[list[PlannedEvent], int]:
        """One event per export row of ``customer`` (and after ``since``); rows skipped."""
        mine = [
            row
            for row in rows
            if row.customer == customer and (since is None or row.timestamp >= since)
        ]
        item_names: dict[str, str | None] = {}
        if any(row.event_name is None for row in mine):
            for item in await self.reader.customer_items(customer):
                item_names[item.item] = self.event_name_of(item)
        planned: list[PlannedEvent] = []
        for row in mine:
            name = row.event_name
            if name is None:
                item_id = row.subscription_item or ""
                if item_id not in item_names:
                    msg = (
                        f"line {row.line}: column subscription_item {item_id!r} is not an "
                        f"item of {customer}; fix: give the customer's item, or an event_name"
                    )
                    raise BackfillInputError(msg)
                name = item_names[item_id]
                if name is None:
                    msg = (
                        f"line {row.line}: column subscription_item {item_id!r} maps to no "
                        "meter; fix: `dualwrite meters apply`, or give an event_name"
                    )
                    raise BackfillInputError(msg)
            if row.timestamp > self.now + 300:
                msg = f"line {row.line}: column timestamp {row.timestamp} is in the future"
                raise BackfillInputError(msg)
            event = UsageEvent(
                identifier=f"backfill:export:{_derived(customer, row.identifier)}",
                customer=customer,
                event_name=name,
                subscription_item=row.subscription_item,
                quantity=row.quantity,
                timestamp=row.timestamp,
            )
            planned.append(
                PlannedEvent(f"export line {row.line}", event, self.too_old(row.timestamp))
            )
        return planned, len(rows) - len(mine)
