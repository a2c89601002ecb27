"""``MoneyPricer``: the money of one reconciliation record, from the legs the reconciler read.

Which prices: the customer's one item carrying the event name's usage. On a legacy metered price,
that price is the legacy one and the meter-backed one is mapped to it in ``[[meters]]
meter_prices`` (by price id or lookup key); once the item moved to a meter-backed price, that price
is the meter one and the legacy one is the price mapped to it. Prices are read once per run
(``StripeReader.price``), previews once per subscription and swap.
"""

from __future__ import annotations

import asyncio

from dualwrite.config import MeterMapping, Settings
from dualwrite.exceptions import PriceError
from dualwrite.ledger import LedgerRow
from dualwrite.pricing import Price
from dualwrite.reconcile._money import MoneyBasis, MoneyCheck, price_legs
from dualwrite.reconcile._records import LegCheck
from dualwrite.stripe_io import InvoicePreview, StripeReader, StripeReadError, SubscriptionItemInfo

__all__ = ["MoneyPricer"]

#: Leg skips that still leave a total to price: Stripe's (read but not comparable with the ledger's
#: sum) or the ledger's (the period is still open, or not settled yet).
_PRICEABLE = (None, "not_comparable", "open_period", "not_settled")
_OPEN = ("open_period", "not_settled")


class MoneyPricer:
    """Prices the legs of reconciliation records (``Reconciler(money=True)``).

    Args:
        reader: reads prices and previews (its cache is the run's).
        settings: the ``[[meters]]`` mappings (``meter_prices``).
        preview: cross-check open periods with Stripe's invoice preview.
    """

    def __init__(self, reader: StripeReader, settings: Settings, *, preview: bool = False):
        self.reader = reader
        self.settings = settings
        self.preview = preview
        self._previews: dict[tuple[str, str, str], InvoicePreview | StripeReadError] = {}
        self._lock = asyncio.Lock()

    async def check(
        self,
        row: LedgerRow,
        legacy: LegCheck,
        meter: LegCheck,
        *,
        items: list[SubscriptionItemInfo],
        formula: str | None,
    ) -> MoneyCheck:
        """The record's money: both legs priced, or why not."""
        if legacy.skipped not in _PRICEABLE or meter.skipped not in _PRICEABLE:
            legs = f"legacy {legacy.skipped or 'compared'}, meter {meter.skipped or 'compared'}"
            return MoneyCheck(skipped="not_comparable", detail=f"no total to price: {legs}")
        if bool(legacy.expected_qty) != bool(meter.expected_qty):
            written = "legacy" if legacy.expected_qty else "meter"
            detail = f"dualwrite wrote only the {written} leg in {row.period}: nothing to compare"
            return MoneyCheck(skipped="one_leg", detail=detail)
        if len(items) != 1:
            names = ", ".join(item.item for item in items)
            detail = (
                f"{len(items)} items carry {row.event_name} ({names}); money compares one item "
                "per event name"
                if items
                else f"no subscription item of {row.customer} is known to carry {row.event_name}"
            )
            return MoneyCheck(skipped="no_price", detail=detail)
        [item] = items
        mapping = next((m for m in self.settings.meters if m.event_name == row.event_name), None)
        legacy_id, meter_id = _price_ids(item, mapping)
        if legacy_id is None:
            detail = (
                f"{item.item} is on {item.price}, which is not a legacy metered price and is not "
                f"mapped from one in [[meters]] meter_prices of {row.event_name}"
            )
            return MoneyCheck(skipped="no_price", detail=detail)
        if meter_id is None:
            detail = (
                f"no meter-backed price is mapped to {legacy_id}: add it to the [[meters]] table "
                f'of {row.event_name} as meter_prices = {{ {legacy_id} = "price_..." }} '
                "(`dualwrite meters plan` proposes one, `meters apply` creates and maps it)"
            )
            return MoneyCheck(legacy_price=legacy_id, skipped="no_meter_price", detail=detail)
        try:
            legacy_price, meter_price = await asyncio.gather(
                self.reader.price(legacy_id), self.reader.price(meter_id)
            )
        except StripeReadError as exc:
            return MoneyCheck(
                legacy_price=legacy_id,
                meter_price=meter_id,
                skipped="stripe_error",
                detail=str(exc),
            )
        except PriceError as exc:
            return MoneyCheck(
                legacy_price=legacy_id, meter_price=meter_id, skipped="price_error", detail=str(exc)
            )
        totals = _totals(legacy, meter, legacy_price, formula)
        if isinstance(totals, str):
            return MoneyCheck(
                legacy_price=legacy_id,
                meter_price=meter_id,
                skipped="not_comparable",
                detail=totals,
            )
        legacy_qty, meter_qty, basis = totals
        check = price_legs(legacy_price, legacy_qty, meter_price, meter_qty, basis=basis)
        if not self.preview or check.skipped is not None:
            return check
        if basis != "ledger" or legacy.skipped != "open_period":
            detail = (
                "Stripe previews the subscription's next invoice: only a running period has one"
            )
            return check.model_copy(update={"preview_detail": detail})
        return await self._previewed(check, item, legacy_id, meter_id)

    async def _previewed(
        self, check: MoneyCheck, item: SubscriptionItemInfo, legacy_id: str, meter_id: str
    ) -> MoneyCheck:
        """The check with Stripe's preview of the item's line, as it stands and swapped."""
        plain = await self._preview(item.subscription, "", "")
        if isinstance(plain, StripeReadError):
            return check.model_copy(
                update={"preview_detail": f"Stripe refused the preview: {plain}"}
            )
        swapped = await self._preview(item.subscription, item.item, meter_id)
        if isinstance(swapped, StripeReadError):
            detail = f"Stripe refused the preview: {swapped}"
            return check.model_copy(update={"preview_detail": detail})
        legacy_amount = plain.amount_for(item.item, price=legacy_id)
        meter_amount = swapped.amount_for(item.item, price=meter_id)
        missing = [
            f"no line of {item.item} at {price} in the {how} preview"
            + ("" if preview.complete else " (its first page)")
            for amount, price, how, preview in (
                (legacy_amount, legacy_id, "plain", plain),
                (meter_amount, meter_id, "swapped", swapped),
            )
            if amount is None
        ]
        update: dict[str, object] = {
            "preview_legacy_amount": legacy_amount,
            "preview_meter_amount": meter_amount,
            "preview_detail": "; ".join(missing),
        }
        return check.model_copy(update=update)

    async def _preview(
        self, subscription: str, item: str, price: str
    ) -> InvoicePreview | StripeReadError:
        """A preview read once per run (a refusal is kept, not retried)."""
        key = (subscription, item, price)
        async with self._lock:
            if key not in self._previews:
                swap = {item: price} if item else None
                try:
                    self._previews[key] = await self.reader.preview_invoice(subscription, swap=swap)
                except StripeReadError as exc:
                    self._previews[key] = exc
            return self._previews[key]


def _price_ids(
    item: SubscriptionItemInfo, mapping: MeterMapping | None
) -> tuple[str | None, str | None]:
    """The legacy and the meter-backed price of the item's usage (None: unknown)."""
    prices = mapping.meter_prices if mapping is not None else {}
    if item.legacy_metered:
        meter = prices.get(item.price or "") or prices.get(item.lookup_key or "")
        return item.price, meter
    if item.meter is not None:
        legacy = next((old for old, new in prices.items() if new == item.price), None)
        return legacy, item.price
    return None, None


def _totals(
    legacy: LegCheck, meter: LegCheck, legacy_price: Price, formula: str | None
) -> tuple[int | float, int | float, MoneyBasis] | str:
    """The totals to price and whose they are, or why there are none."""
    if legacy.stripe_qty is not None and meter.stripe_qty is not None:
        return legacy.stripe_qty, meter.stripe_qty, "stripe"
    if legacy.skipped not in _OPEN and meter.skipped not in _OPEN:
        return (
            "Stripe's totals were not read "
            f"(legacy: {legacy.detail or legacy.skipped}; meter: {meter.detail or meter.skipped})"
        )
    aggregation = legacy_price.aggregate_usage or "sum"
    if aggregation != "sum" or formula != "sum":
        return (
            f"the period is not settled, and a {aggregation} price or a {formula} meter does not "
            "bill the ledger's sums: reconcile it once it is"
        )
    return legacy.accepted_qty, meter.accepted_qty, "ledger"
