"""Billed quantities: a period's raw usage aggregated as a legacy price or a meter does."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, get_args

from dualwrite.exceptions import PriceError

__all__ = [
    "AGGREGATE_USAGE",
    "METER_FORMULAS",
    "MeterEvent",
    "UsageRecord",
    "billed_legacy_usage",
    "billed_meter_usage",
]

AggregateUsage = Literal["sum", "max", "last_during_period", "last_ever"]
MeterFormula = Literal["sum", "count", "last"]

AGGREGATE_USAGE: tuple[AggregateUsage, ...] = get_args(AggregateUsage)
METER_FORMULAS: tuple[MeterFormula, ...] = get_args(MeterFormula)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """A legacy usage record: ``increment`` adds to the quantity at its timestamp, ``set``
    overwrites it."""

    timestamp: int
    quantity: int
    action: Literal["increment", "set"] = "increment"


@dataclass(frozen=True, slots=True)
class MeterEvent:
    """A meter event that Stripe counted (not cancelled, not refused)."""

    timestamp: int
    value: int | Decimal = 1


def billed_legacy_usage(
    records: Iterable[UsageRecord], aggregate_usage: str, *, start: int, end: int
) -> int:
    """The quantity a legacy metered price bills for the period ``[start, end)``, from its item's
    usage records (in the order Stripe received them).

    Raises:
        PriceError: ``aggregate_usage`` is none of Stripe's four.
    """
    if aggregate_usage not in AGGREGATE_USAGE:
        msg = (
            f"aggregate_usage must be one of {', '.join(AGGREGATE_USAGE)}, not {aggregate_usage!r}"
        )
        raise PriceError(msg)
    values: dict[int, int] = {}
    for record in records:
        before = 0 if record.action == "set" else values.get(record.timestamp, 0)
        values[record.timestamp] = before + record.quantity
    if aggregate_usage == "last_ever":
        # The latest usage at or before the period's end, whichever period it was reported in.
        reported = [ts for ts in values if ts < end]
        return values[max(reported)] if reported else 0
    mine = {ts: quantity for ts, quantity in values.items() if start <= ts < end}
    if not mine:
        return 0
    if aggregate_usage == "max":
        return max(mine.values())
    if aggregate_usage == "last_during_period":
        return mine[max(mine)]
    return sum(mine.values())


def billed_meter_usage(
    events: Iterable[MeterEvent], formula: str, *, start: int, end: int
) -> Decimal:
    """The quantity a meter-backed price bills for the period ``[start, end)``, from the meter's
    events for the customer (in the order Stripe received them): their ``sum``, their ``count``,
    or the ``last`` value (0 without events).

    Raises:
        PriceError: ``formula`` is none of Stripe's three.
    """
    if formula not in METER_FORMULAS:
        msg = f"a meter formula must be one of {', '.join(METER_FORMULAS)}, not {formula!r}"
        raise PriceError(msg)
    mine = [event for event in events if start <= event.timestamp < end]
    if formula == "count":
        return Decimal(len(mine))
    if formula == "last":
        if not mine:
            return Decimal(0)
        latest = max(event.timestamp for event in mine)
        return Decimal([event for event in mine if event.timestamp == latest][-1].value)
    return sum((Decimal(event.value) for event in mine), Decimal(0))
