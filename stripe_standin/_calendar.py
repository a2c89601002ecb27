"""Stripe's calendar, written from Stripe's documentation (and from nothing in dualwrite).

Billing periods (docs.stripe.com/billing/subscriptions/billing-cycle): the billing cycle anchor
"sets the day of week for week intervals, the day of month for month and year intervals, and the
month of year for year intervals", and "a monthly subscription with a billing cycle anchor date of
January 31 bills the last day of the month closest to the anchor date, so February 28 (or
February 29 in a leap year), then March 31, April 30". So every boundary is counted from the
anchor itself (boundary ``n`` is the anchor plus ``n * interval_count`` intervals, the anchor's day
clamped to short months), never from the boundary before: a clamped Feb 28 is not the next
period's day of month. Days and weeks are fixed lengths of UTC seconds. A period holds its start
and not its end (``[start, end)``): the subscription's ``current_period_end`` is when the next
period begins.

Before the anchor, a subscription created earlier is in its first, prorated period
``[created, anchor)`` ("full billing periods start on the first full invoice date, which is often
the same as the billing cycle anchor").

Timestamps:

* usage records (docs.stripe.com/api/usage_records/create): "must be within the current billing
  period of the subscription of the provided subscription_item, and must not be in the future";
* meter events (docs.stripe.com/api/billing/meter-event/create): "within the past 35 calendar days
  or up to 5 minutes in the future" (read here as 35 * 24 h before now, both edges included);
* meter event summaries (docs.stripe.com/api/billing/meter-event-summary/list): ``start_time`` and
  ``end_time`` "need to be aligned with minute boundaries", hour boundaries with
  ``value_grouping_window=hour`` and UTC midnight with ``day``; ``start_time`` is included and
  ``end_time`` excluded.
"""

from __future__ import annotations

import calendar
import functools
from datetime import UTC, datetime
from typing import Literal

__all__ = [
    "DAY",
    "MAX_EVENT_AGE",
    "MAX_EVENT_LEAD",
    "Grouping",
    "Interval",
    "boundary",
    "is_aligned",
    "meter_event_problem",
    "period_at",
    "subscription_period",
    "usage_record_problem",
]

Interval = Literal["day", "week", "month", "year"]
"""A recurring price's ``recurring[interval]``."""
Grouping = Literal["minute", "hour", "day"]
"""A summary window's alignment: every summary bound is minute-aligned, groupings ask for more."""

DAY = 86_400
MAX_EVENT_AGE = 35 * DAY
"""How far back a meter event's timestamp may be."""
MAX_EVENT_LEAD = 5 * 60
"""How far ahead a meter event's timestamp may be (clock drift)."""

_FIXED = {"day": DAY, "week": 7 * DAY}
_MONTHS = {"month": 1, "year": 12}
_ALIGNMENT = {"minute": 60, "hour": 3_600, "day": DAY}


def boundary(anchor: int, interval: Interval, interval_count: int, n: int) -> int:
    """The ``n``-th period boundary of a cycle anchored at ``anchor`` (``n`` may be negative)."""
    steps = n * interval_count
    if interval in _FIXED:
        return anchor + steps * _FIXED[interval]
    origin = datetime.fromtimestamp(anchor, tz=UTC)
    months_since_year_zero = origin.year * 12 + origin.month - 1 + steps * _MONTHS[interval]
    year, month_index = divmod(months_since_year_zero, 12)
    last_day = calendar.monthrange(year, month_index + 1)[1]
    moved = origin.replace(year=year, month=month_index + 1, day=min(origin.day, last_day))
    return int(moved.timestamp())


# Every API call looks at every subscription's current period (invoicing what ended): the same few
# arguments each time, and the month arithmetic was most of a call's time with 1,000 subscriptions.
@functools.lru_cache(maxsize=1 << 16)
def period_at(anchor: int, interval: Interval, interval_count: int, ts: int) -> tuple[int, int]:
    """The full billing period ``[start, end)`` of an anchored cycle that holds ``ts``."""
    if interval in _FIXED:
        length = _FIXED[interval] * interval_count
        n = (ts - anchor) // length
        return anchor + n * length, anchor + (n + 1) * length
    origin = datetime.fromtimestamp(anchor, tz=UTC)
    moment = datetime.fromtimestamp(ts, tz=UTC)
    months = (moment.year - origin.year) * 12 + moment.month - origin.month
    n = months // (_MONTHS[interval] * interval_count)
    # The month count is a first guess: the anchor's day and time of day can put ``ts`` one
    # period earlier (or, after clamping, later). Step until the period holds ``ts``.
    while boundary(anchor, interval, interval_count, n) > ts:
        n -= 1
    while boundary(anchor, interval, interval_count, n + 1) <= ts:
        n += 1
    return (
        boundary(anchor, interval, interval_count, n),
        boundary(anchor, interval, interval_count, n + 1),
    )


def subscription_period(
    *, created: int, anchor: int, interval: Interval, interval_count: int, ts: int
) -> tuple[int, int]:
    """A subscription's billing period holding ``ts``: the prorated ``[created, anchor)`` before a
    later anchor, else the anchored cycle's full period."""
    if created < anchor and created <= ts < anchor:
        return created, anchor
    return period_at(anchor, interval, interval_count, ts)


def usage_record_problem(ts: int, *, now: int, period_start: int) -> str | None:
    """Why a usage record timestamp is refused (``"future"`` or ``"before_period"``), or None."""
    if ts > now:
        return "future"
    if ts < period_start:
        return "before_period"
    return None


def meter_event_problem(ts: int, *, now: int) -> str | None:
    """Why a meter event timestamp is refused (``"too_old"`` or ``"future"``), or None."""
    if ts < now - MAX_EVENT_AGE:
        return "too_old"
    if ts > now + MAX_EVENT_LEAD:
        return "future"
    return None


def is_aligned(ts: int, grouping: Grouping) -> bool:
    """Whether ``ts`` is on a minute, hour or UTC-day boundary."""
    return ts % _ALIGNMENT[grouping] == 0
