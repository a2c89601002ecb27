"""The stand-in's clock, and API v2's date-time strings.

The clock runs with real time from its start (so a demo's "now" keeps moving) and can be moved
forward or set. Billing periods live in ``_calendar``; Stripe's own test clocks in ``_test_clocks``.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from stripe_standin._errors import StandinError

__all__ = ["StandinClock", "format_iso", "parse_iso"]


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
            raise StandinError(msg)
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
