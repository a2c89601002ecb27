"""Stripe's clock, as seen from this process through the ``Date`` header of Stripe's replies.

Stripe refuses usage records stamped later than its own now, so the instant dualwrite fixes for a
``timestamp`` of ``now`` must never be ahead of Stripe's clock, whatever the host's clock says.
Every reply Stripe sends carries ``Date`` (whole seconds, taken before the reply left): at the
moment the reply is read, Stripe's now is at least that ``Date``. So ``Date - local now`` is a lower
bound of the offset between the two clocks; the largest bound seen in the last few seconds is the
estimate (many replies make it precise to the network latency), and a short window lets a clock
that was stepped back be followed within seconds. Until a first reply has been seen the local
clock is used as it is; ``StripeWriter.stripe_now`` makes one unauthenticated request first.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable
from email.utils import parsedate_to_datetime

__all__ = ["OFFSET_WINDOW_SECONDS", "StripeClock"]

#: Samples older than this (seconds) no longer raise the estimate.
OFFSET_WINDOW_SECONDS = 10.0


# Cached: every reply of a second carries the same value, and parsing it costs more than the rest
# of the clock's bookkeeping per request.
@functools.lru_cache(maxsize=64)
def _http_date(value: str) -> int | None:
    """An HTTP ``Date`` header (RFC 9110 IMF-fixdate) as Unix seconds, else None."""
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return int(moment.timestamp())


class StripeClock:
    """The estimate of Stripe's now, never later than Stripe's own clock.

    Args:
        local: this process's clock (the app's; it may be off by seconds).
        window: how long (seconds) a sample keeps raising the estimate.
    """

    def __init__(
        self, *, local: Callable[[], float] = time.time, window: float = OFFSET_WINDOW_SECONDS
    ):
        self._local = local
        self._window = window
        # (monotonic time, bound): bounds decrease from left to right, so the first is the largest
        # of the window (a sliding-window maximum).
        self._bounds: deque[tuple[float, float]] = deque()
        self._latest: float | None = None

    @property
    def known(self) -> bool:
        """Whether a reply from Stripe has been seen."""
        return self._latest is not None

    def observe(self, date: str | None) -> None:
        """Note a reply's ``Date`` header, read just now (a missing or bad one is ignored)."""
        if not date:
            return
        stripe_seconds = _http_date(date)
        if stripe_seconds is None:
            return
        bound = stripe_seconds - self._local()
        seen = time.monotonic()
        bounds = self._bounds
        while bounds and bounds[-1][1] <= bound:
            bounds.pop()
        bounds.append((seen, bound))
        self._latest = bound

    def offset(self) -> float | None:
        """Stripe's now minus the local now, at least (None: no reply seen yet)."""
        cutoff = time.monotonic() - self._window
        bounds = self._bounds
        while len(bounds) > 1 and bounds[0][0] < cutoff:
            bounds.popleft()
        if bounds and bounds[0][0] >= cutoff:
            return bounds[0][1]
        return self._latest

    def now(self) -> int:
        """Stripe's now in whole seconds, at most (the local clock until a reply is seen)."""
        local = self._local()
        offset = self.offset()
        return int(local) if offset is None else math.floor(local + offset)
