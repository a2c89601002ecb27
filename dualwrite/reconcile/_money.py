"""Money parity: what each leg's price bills for the leg's total, and their difference.

Per customer, meter event name and period, ``reconcile --money`` prices the legacy leg's total with
the legacy metered price of the customer's item, and the meter leg's total with the meter-backed
price that replaces it (``[[meters]] meter_prices``, which ``meters apply`` writes; or the item's own
price once it moved). The totals are Stripe's own (``basis="stripe"``: the usage record summary and
the meter event summary, each already aggregated by its price's ``aggregate_usage`` or its meter's
formula) once the period is closed and settled; before that, the ledger's accepted quantities
(``basis="ledger"``), which only a ``sum`` price and a ``sum`` meter bill as they are.

``difference`` is ``meter_amount - legacy_amount``: how much more (or, negative, less) the
customer's invoice would be on the meter path. ``--preview`` cross-checks an open period with
Stripe's own preview of the invoice, as it stands and with the item's price swapped.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict

from dualwrite.exceptions import PriceError
from dualwrite.pricing import Price, format_amount

__all__ = ["MoneyBasis", "MoneyCheck", "MoneySkip", "price_legs"]

MoneyBasis = Literal["stripe", "ledger"]
"""Whose totals were priced: Stripe's (a closed, settled period) or the ledger's (still open)."""

MoneySkip = Literal[
    "one_leg",
    "no_price",
    "no_meter_price",
    "price_error",
    "stripe_error",
    "not_comparable",
    "currency_differs",
]
"""Why the legs were not priced:

* ``one_leg``: dualwrite wrote only one leg for the period (the customer was at ``legacy`` or
  ``meter``): there is nothing to compare;
* ``no_price``: no single legacy metered price carries the usage (no item, or several);
* ``no_meter_price``: no meter-backed price is mapped to the legacy price (``[[meters]]
  meter_prices``; ``dualwrite meters apply`` writes it);
* ``price_error``: a price cannot be turned into amounts (the detail says why);
* ``stripe_error``: Stripe refused reading a price;
* ``not_comparable``: no total to price (a leg not read, or an open period whose aggregation the
  ledger's sums cannot stand for);
* ``currency_differs``: the two prices bill in different currencies (never ready).
"""


class MoneyCheck(BaseModel):
    """The money of one reconciliation record: each leg's price and amount, their difference,
    and Stripe's preview of them when asked for."""

    model_config = ConfigDict(frozen=True)

    currency: str | None = None
    legacy_price: str | None = None
    meter_price: str | None = None
    basis: MoneyBasis | None = None
    legacy_qty: int | float | None = None
    """The legacy total priced."""
    meter_qty: int | float | None = None
    """The meter total priced."""
    legacy_amount: int | None = None
    """What the legacy price bills for ``legacy_qty`` (smallest currency unit)."""
    meter_amount: int | None = None
    """What the meter-backed price bills for ``meter_qty`` (smallest currency unit)."""
    skipped: MoneySkip | None = None
    detail: str = ""
    preview_legacy_amount: int | None = None
    """Stripe's preview of the item's invoice line as it stands."""
    preview_meter_amount: int | None = None
    """Stripe's preview of the item's line with its price swapped to ``meter_price``."""
    preview_detail: str = ""

    @property
    def difference(self) -> int | None:
        """``meter_amount - legacy_amount`` (None: not priced)."""
        if self.legacy_amount is None or self.meter_amount is None:
            return None
        return self.meter_amount - self.legacy_amount

    def differs(self, tolerance: int = 0) -> bool:
        """Whether the invoices would differ by more than ``tolerance`` (or in currency)."""
        if self.skipped == "currency_differs":
            return True
        return self.difference is not None and abs(self.difference) > tolerance

    @property
    def preview_agrees(self) -> bool | None:
        """Whether Stripe's preview bills what dualwrite computed on both legs (None: no
        preview)."""
        if self.preview_legacy_amount is None and self.preview_meter_amount is None:
            return None
        return (self.preview_legacy_amount, self.preview_meter_amount) == (
            self.legacy_amount,
            self.meter_amount,
        )

    def describe(self) -> str:
        """The check in words: both amounts and the difference, or why it was skipped."""
        if self.skipped is not None:
            return f"{self.skipped}: {self.detail}"
        if self.currency is None or self.legacy_amount is None or self.meter_amount is None:
            return "not priced"
        legacy = format_amount(self.legacy_amount, self.currency)
        meter = format_amount(self.meter_amount, self.currency)
        difference = format_amount(self.difference or 0, self.currency, signed=True)
        return f"legacy {legacy}, meter {meter}, difference {difference}"


def _quantity(value: int | float) -> int | Decimal:
    # Meter summaries come back as floats; their values are whole numbers of at most 15 digits,
    # which a float holds exactly, and str() writes without binary noise.
    return value if isinstance(value, int) else Decimal(str(value))


def price_legs(
    legacy: Price,
    legacy_qty: int | float,
    meter: Price,
    meter_qty: int | float,
    *,
    basis: MoneyBasis,
) -> MoneyCheck:
    """Each leg's total priced by its price, in the currency's smallest unit."""
    common = {
        "legacy_price": legacy.id,
        "meter_price": meter.id,
        "basis": basis,
        "legacy_qty": legacy_qty,
        "meter_qty": meter_qty,
    }
    if legacy.currency != meter.currency:
        detail = (
            f"{legacy.id} bills in {legacy.currency.upper()}, {meter.id} in "
            f"{meter.currency.upper()}: the invoice would change currency"
        )
        return MoneyCheck(skipped="currency_differs", detail=detail, **common)
    try:
        legacy_amount = legacy.amount(_quantity(legacy_qty))
        meter_amount = meter.amount(_quantity(meter_qty))
    except PriceError as exc:
        return MoneyCheck(skipped="price_error", detail=str(exc), **common)
    detail = "; ".join(legacy.differences(meter))
    return MoneyCheck(
        currency=legacy.currency,
        legacy_amount=legacy_amount,
        meter_amount=meter_amount,
        detail=f"the prices differ: {detail}" if detail else "",
        **common,
    )
