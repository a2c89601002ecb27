"""Which Stripe figure belongs to a ledger row: the items carrying an event name, the usage record
summary of a billing period, the meter summary window of a period."""

from __future__ import annotations

from collections.abc import Sequence

from dualwrite.config import Settings
from dualwrite.periods import Period
from dualwrite.stripe_io import SubscriptionItemInfo, UsageSummary

__all__ = ["BOUND_SLACK", "assign_items", "meter_window", "summary_matches"]

#: A summary bound this many seconds off the ledger's still matches (an inclusive bound written as
#: the last second it includes).
BOUND_SLACK = 1


def meter_window(span: Period) -> tuple[int, int]:
    """The meter summary window of a ledger period: both ends floored to the minute.

    Stripe only summarises minute-aligned windows. Flooring both ends keeps consecutive periods'
    windows back to back, so every event is counted in exactly one window; with a period bound
    inside a minute, the events of that minute's first seconds fall in the neighbouring window.
    """
    return span.start - span.start % 60, span.end - span.end % 60


def summary_matches(summary: UsageSummary, span: Period) -> bool:
    """Whether a usage record summary is the one of billing period ``span``: same start and end,
    to the second (``BOUND_SLACK`` allowed)."""
    if summary.start is None or summary.end is None:
        return False
    return (
        abs(summary.start - span.start) <= BOUND_SLACK
        and abs(summary.end - span.end) <= BOUND_SLACK
    )


def assign_items(
    items: Sequence[SubscriptionItemInfo],
    event_names: set[str],
    settings: Settings,
    meter_names: dict[str, str],
) -> dict[str, list[SubscriptionItemInfo]]:
    """Which items carry each event name's legacy usage, first rule that applies:

    1. the item is named in ``[items]``;
    2. its price id or lookup key is listed in a ``[[meters]]`` table's ``legacy_prices`` /
       ``lookup_keys``;
    3. its price is meter-backed (the item moved at cutover): the meter's event name;
    4. failing all of them: the customer's one remaining legacy metered item, if exactly one event
       name is left without an item.
    """
    by_price: dict[str, str] = {}
    for meter in settings.meters:
        for price in (*meter.legacy_prices, *meter.lookup_keys):
            by_price.setdefault(price, meter.event_name)
    found: dict[str, list[SubscriptionItemInfo]] = {}
    rest: list[SubscriptionItemInfo] = []
    for item in items:
        known = settings.items.get(item.item)
        name: str | None = (
            (known.event_name if known else None)
            or by_price.get(item.price or "")
            or by_price.get(item.lookup_key or "")
            or meter_names.get(item.meter or "")
        )
        if name is None:
            rest.append(item)
        else:
            found.setdefault(name, []).append(item)
    left = sorted(event_names - set(found))
    legacy = [item for item in rest if item.legacy_metered]
    if len(left) == 1 and len(legacy) == 1:
        found[left[0]] = legacy
    return found
