"""What dualwrite reads about a subscription item from Stripe: its customer and billing periods.

One read of the item (and its subscription) serves three needs: the proxy maps an item's usage to
a customer and meter with it, the ledger files usage under the item's billing period, and the
middleware checks that the item named by a request belongs to the customer the request names
(usage on another customer's item would bill two customers). The read is retried when Stripe says
so (429, 5xx, the network), and what it found is kept by ``PeriodResolver`` (in memory and Redis),
so an item is read about once per billing period.
"""

from __future__ import annotations

import asyncio
import logging

from dualwrite.config import Settings
from dualwrite.exceptions import StoreUnavailableError, UsageInputError
from dualwrite.models import StripeFailure, UsageEvent
from dualwrite.periods import INTERVALS, ItemPeriods, PeriodResolver
from dualwrite.stripe_io import ItemDetails, StripeWriter

__all__ = ["ITEM_READ_ATTEMPTS", "ItemReads", "periods_of"]

log = logging.getLogger(__name__)

#: How many times a subscription item is read before Stripe's refusal is accepted (its billing
#: period then follows from the anchor already known, if any).
ITEM_READ_ATTEMPTS = 3


def periods_of(details: ItemDetails | StripeFailure) -> ItemPeriods | None:
    """An item's current period, interval, anchor and customer, when Stripe's reply has them."""
    if not isinstance(details, ItemDetails) or details.interval not in INTERVALS:
        return None
    if details.period_start is None or details.period_end is None:
        return None
    return ItemPeriods(
        start=details.period_start,
        end=details.period_end,
        interval=details.interval,  # checked against INTERVALS above
        interval_count=details.interval_count,
        anchor=details.billing_cycle_anchor,
        customer=details.customer,
    )


class ItemReads:
    """Reads subscription items from Stripe for the engine (see the module docstring).

    ``periods`` is given later (``attach``): the resolver itself looks items up through here.
    """

    def __init__(self, settings: Settings, writer: StripeWriter):
        self._settings = settings
        self._writer = writer
        self._periods: PeriodResolver | None = None

    def attach(self, periods: PeriodResolver) -> None:
        """Keep what each read finds in ``periods``."""
        self._periods = periods

    async def read(self, item: str, *, api_key: str) -> ItemDetails | StripeFailure:
        """Read an item, retrying what Stripe says is worth retrying: many customers sharing an
        anchor roll over, and read, together."""
        wait = self._settings.stripe.request_retry_wait
        for attempt in range(ITEM_READ_ATTEMPTS):
            details = await self._writer.retrieve_item(item, api_key=api_key)
            if isinstance(details, ItemDetails) or not details.retryable:
                return details
            if attempt + 1 < ITEM_READ_ATTEMPTS:
                await asyncio.sleep(max(wait * 2**attempt, min(details.retry_after or 0.0, 2.0)))
        return details

    async def retrieve(self, item: str, *, api_key: str) -> ItemDetails | StripeFailure:
        """Read an item and keep its billing period and customer."""
        details = await self.read(item, api_key=api_key)
        periods = periods_of(details)
        if periods is not None and self._periods is not None:
            try:
                await self._periods.remember(item, periods)
            except StoreUnavailableError:
                log.warning("Redis unavailable: billing period of %s not cached", item)
        return details

    async def periods(self, item: str, api_key: str | None) -> ItemPeriods | None:
        """An item's billing periods read from Stripe (``PeriodResolver``'s lookup)."""
        key = api_key or self._settings.stripe_api_key_value()
        if key is None:
            return None
        return periods_of(await self.read(item, api_key=key))

    async def check_owner(self, event: UsageEvent, *, api_key: str | None) -> StripeFailure | None:
        """Refuse usage whose subscription item belongs to another customer than the event's.

        Items mapped in ``[items]`` were checked when the event was built; others are read once
        (then kept). Returns Stripe's failure when the item could not be read for a reason worth
        retrying, or because Stripe refused the key itself (the usage is then refused with that
        failure, and nothing is written: a refused key is the key holder's business, not a fault
        of the item the caller named).

        Raises:
            UsageInputError: the item belongs to another customer, or Stripe has no such item;
                ``param`` is ``subscription_item``.
        """
        item = event.subscription_item
        key = api_key or self._settings.stripe_api_key_value()
        if item is None or item in self._settings.items or key is None:
            return None
        known = None
        if self._periods is not None:
            try:
                known = await self._periods.cached(item)
            except StoreUnavailableError:
                known = None
        owner = known.customer if known is not None else None
        if owner is None:
            details = await self.retrieve(item, api_key=key)
            if isinstance(details, StripeFailure):
                if details.retryable or details.refused_key:
                    return details
                msg = f"subscription_item {item} could not be read: {details.message}"
                code = details.code or "resource_missing"
                raise UsageInputError(msg, param="subscription_item", code=code)
            owner = details.customer
        if owner != event.customer:
            msg = (
                f"subscription_item {item} does not belong to customer {event.customer}: usage "
                "goes on the customer whose subscription holds the item"
            )
            raise UsageInputError(msg, param="subscription_item", code="parameter_invalid")
        return None
