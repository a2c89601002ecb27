"""The stand-in's clock and billing-period arithmetic.

The clock runs with real time from its start (so a demo's "now" keeps moving) and can be moved
forward or set, as Stripe's test clocks are. Billing periods are computed from a subscription's
anchor: ``[anchor + k·interval, anchor + (k+1)·interval)``, by calendar arithmetic in UTC for months
and years (the anchor's day of month is kept, clamped to short months) and by seconds for days and
weeks.
"""

from __future__ import annotations

import calendar
import threading
import time
from datetime import UTC, datetime
from typing import Literal

from dualwrite.exceptions import StripeStandinError

__all__ = [
    "Interval",
    "StandinClock",
    "add_interval",
    "format_iso",
    "parse_iso",
    "period_containing",
]

Interval = Literal["day", "week", "month", "year"]
"""A recurring price's billing interval."""

_SECONDS = {"day": 86_400, "week": 7 * 86_400}


class StandinClock:
    """The stand-in's notion of now: starts at ``start_time`` (or the real time) and keeps ticking."""

    def __init__(self, start_time: int | None = None) -> None:
        self._lock = threading.Lock()
        # A float base: in real-time mode the clock must read exactly int(time.time()), or a client's
        # "now" would look up to a second in the future to the stand-in.
        self._base: float = time.time() if start_time is None else int(start_time)
        self._started = time.monotonic()

    def now(self) -> int:
        """The current Unix time on this clock."""
        with self._lock:
            return int(self._base + time.monotonic() - self._started)

    def advance(self, seconds: int) -> int:
        """Move the clock forward by ``seconds`` and return the new now."""
        if seconds < 0:
            msg = f"clock.advance() takes a non-negative number of seconds, got {seconds}"
            raise StripeStandinError(msg)
        with self._lock:
            self._base += int(seconds)
            return int(self._base + time.monotonic() - self._started)

    def set(self, ts: int) -> None:
        """Put the clock at Unix time ``ts`` (it keeps ticking from there)."""
        with self._lock:
            self._base = int(ts)
            self._started = time.monotonic()


def format_iso(ts: int) -> str:
    """A Unix time as API v2 writes it: ``2024-06-01T12:00:00.000Z`` (Stripe's docs examples)."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_iso(text: str) -> int | None:
    """An RFC 3339 date-time (``Z`` or an offset, fractions allowed) as Unix seconds, else None."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return int(moment.timestamp())


def add_interval(anchor: int, interval: Interval, count: int) -> int:
    """``anchor`` plus ``count`` intervals (negative counts go back), calendar-aware for months."""
    if interval in _SECONDS:
        return anchor + count * _SECONDS[interval]
    months = count * (12 if interval == "year" else 1)
    start = datetime.fromtimestamp(anchor, tz=UTC)
    month_index = start.year * 12 + (start.month - 1) + months
    year, month = divmod(month_index, 12)
    day = min(start.day, calendar.monthrange(year, month + 1)[1])
    return int(start.replace(year=year, month=month + 1, day=day).timestamp())


def period_containing(anchor: int, interval: Interval, count: int, ts: int) -> tuple[int, int]:
    """The billing period ``[start, end)`` that holds ``ts`` for a subscription anchored at ``anchor``."""
    if interval in _SECONDS:
        length = _SECONDS[interval] * count
        k = (ts - anchor) // length
        return anchor + k * length, anchor + (k + 1) * length
    unit = 12 if interval == "year" else 1
    first = datetime.fromtimestamp(anchor, tz=UTC)
    at = datetime.fromtimestamp(ts, tz=UTC)
    months = (at.year - first.year) * 12 + (at.month - first.month)
    k = months // (unit * count)
    # The estimate can be one period off around the anchor's day and time of day: correct it.
    while add_interval(anchor, interval, k * count) > ts:
        k -= 1
    while add_interval(anchor, interval, (k + 1) * count) <= ts:
        k += 1
    return add_interval(anchor, interval, k * count), add_interval(
        anchor, interval, (k + 1) * count
    )
