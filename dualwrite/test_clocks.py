"""Stripe test clocks: a customer whose subscription lives on one is judged by the clock's time.

Teams rehearse a cutover on test-mode subscriptions attached to a Stripe test clock
(``subscription.test_clock``). Stripe computes those subscriptions' periods, accepts their usage
records and applies their schedules' phases by the clock's ``frozen_time``, which only moves when
someone advances the clock. So every decision dualwrite takes about such a customer's period end
(is its scheduled stage due? is ``--at`` in the past? has its item moved price?) follows the
clock's frozen time too, never the process clock. ``StripeTestClocks`` reads it
(``GET /v1/test_helpers/test_clocks/{id}``) and keeps it ``ttl`` seconds; when a read fails the
last time read stands (a clock only moves forward, so an old reading never makes a period end
come early), and a clock never read falls back to the process clock, with a warning.

Which customers live on a clock is recorded by the cutover that reads their subscription
(``dualwrite.flags.CustomerBilling``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from dualwrite.config import Settings
from dualwrite.exceptions import DualwriteError
from dualwrite.stripe_io import AccountStripe

__all__ = [
    "TEST_CLOCK_TTL",
    "FrozenTimes",
    "StripeTestClocks",
    "customer_now",
    "stripe_test_clocks",
]

log = logging.getLogger(__name__)

#: Seconds a test clock's frozen time is kept before it is read again.
TEST_CLOCK_TTL = 5.0


class FrozenTimes(Protocol):
    """Tells a Stripe test clock's frozen time (``StripeTestClocks``)."""

    async def frozen_time(self, clock: str) -> float | None:
        """The clock's frozen time, or None when it was never read."""
        ...


async def customer_now(clock: str | None, clocks: FrozenTimes | None, now: float) -> float:
    """A customer's "now": its test clock's frozen time when it lives on one (and the clock can
    be told), else ``now`` (the process clock)."""
    if clock is None or clocks is None:
        return now
    frozen = await clocks.frozen_time(clock)
    return now if frozen is None else frozen


class StripeTestClocks:
    """Reads test clocks' frozen times from Stripe, each kept ``ttl`` seconds.

    Args:
        stripe: makes a Stripe adapter for each read (raising ``DualwriteError`` when it cannot,
            e.g. no key); closed after the read, so nothing here needs closing.
        ttl: seconds a reading is kept.
        monotonic: the clock the ``ttl`` is measured with.
    """

    def __init__(
        self,
        stripe: Callable[[], AccountStripe],
        *,
        ttl: float = TEST_CLOCK_TTL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = stripe
        self._ttl = ttl
        self._monotonic = monotonic
        self._known: dict[str, tuple[float, float]] = {}  # clock -> (read at, frozen time)
        self._lock = asyncio.Lock()
        self.reads = 0
        """How many times a clock was read from Stripe."""

    async def frozen_time(self, clock: str) -> float | None:
        """The clock's frozen time (kept ``ttl`` seconds); the last reading when Stripe cannot
        be read now; None when it never could."""
        known = self._known.get(clock)
        if known is not None and self._monotonic() - known[0] < self._ttl:
            return known[1]
        async with self._lock:
            known = self._known.get(clock)
            if known is not None and self._monotonic() - known[0] < self._ttl:
                return known[1]
            try:
                self.reads += 1
                async with self._factory() as stripe:
                    data = await stripe.request("GET", f"/v1/test_helpers/test_clocks/{clock}")
                frozen = float(data["frozen_time"])
            except (DualwriteError, KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "test clock %s could not be read (%s); %s",
                    clock,
                    exc,
                    "using its last reading" if known else "using the process clock",
                )
                return known[1] if known is not None else None
            self._known[clock] = (self._monotonic(), frozen)
            return frozen

    def forget(self) -> None:
        """Drop every reading (the next ``frozen_time`` reads Stripe again)."""
        self._known.clear()


def stripe_test_clocks(settings: Settings) -> StripeTestClocks | None:
    """Test clocks read with the account's key (``STRIPE_API_KEY``); None without one (a proxy
    forwarding its callers' keys: customers on test clocks are then judged by the process
    clock)."""
    api_key = settings.stripe_api_key_value()
    if not api_key:
        return None
    return StripeTestClocks(lambda: AccountStripe(settings.stripe, api_key=api_key))
