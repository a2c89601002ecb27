"""The stand-in's price math: what a price bills for a quantity, in the currency's smallest unit.

Written from Stripe's pricing pages, independently of dualwrite (the stand-in is the judge):

* per unit: the quantity, transformed first when the price has ``transform_quantity`` (divided by
  ``divide_by``, rounded ``up`` or ``down`` to a whole number: package pricing), times
  ``unit_amount_decimal`` (docs.stripe.com/billing/subscriptions/usage-based/manage-billing-setup,
  "Transform quantities");
* tiered, ``volume``: every unit at the tier the whole quantity reaches, plus that tier's flat
  amount; ``graduated``: each tier's units at that tier's unit amount, plus the flat amount of
  every tier reached. ``up_to`` is inclusive; a quantity of 0 reaches the first tier
  (docs.stripe.com/products-prices/pricing-models, "Tiered pricing");
* a fractional total (decimal amounts) is rounded once per invoice line to the nearest whole unit,
  a half up (docs.stripe.com/billing/subscriptions/usage-based/manage-billing-setup,
  "Decimal amounts").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

__all__ = ["PriceTier", "Pricing", "line_amount"]


@dataclass(frozen=True, slots=True)
class PriceTier:
    """One tier: up to ``up_to`` units inclusive (None: the last, ``inf``), amounts in the smallest
    unit."""

    up_to: int | None
    unit_amount: Decimal | None = None
    flat_amount: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Pricing:
    """What decides the amount of a price: its scheme and amounts."""

    billing_scheme: str = "per_unit"
    unit_amount: Decimal | None = None
    tiers_mode: str | None = None
    tiers: tuple[PriceTier, ...] = ()
    divide_by: int | None = None
    round: str | None = None

    def exact(self, quantity: Decimal) -> Decimal:
        """The amount before rounding."""
        if self.billing_scheme == "tiered":
            if self.tiers_mode == "volume":
                return _volume(self.tiers, quantity)
            return _graduated(self.tiers, quantity)
        units = quantity
        if self.divide_by is not None:
            rounding = ROUND_CEILING if self.round == "up" else ROUND_FLOOR
            units = (quantity / self.divide_by).to_integral_value(rounding=rounding)
        return units * (self.unit_amount or Decimal(0))


def line_amount(pricing: Pricing, quantity: int | Decimal) -> int:
    """What one invoice line of ``pricing`` bills for ``quantity``, rounded once, a half up."""
    exact = pricing.exact(Decimal(quantity))
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def _volume(tiers: Sequence[PriceTier], quantity: Decimal) -> Decimal:
    for tier in tiers:
        if tier.up_to is None or quantity <= tier.up_to:
            return (tier.flat_amount or 0) + (tier.unit_amount or 0) * quantity
    return Decimal(0)  # unreachable: creation requires a last tier up to inf


def _graduated(tiers: Sequence[PriceTier], quantity: Decimal) -> Decimal:
    total = Decimal(0)
    below = Decimal(0)  # units billed by the tiers before this one
    for number, tier in enumerate(tiers):
        if number > 0 and quantity <= below:
            break  # this tier is not reached (the first always is)
        top = quantity if tier.up_to is None else min(quantity, Decimal(tier.up_to))
        units = top - below if top > below else Decimal(0)
        total += (tier.flat_amount or 0) + (tier.unit_amount or 0) * units
        if tier.up_to is None:
            break
        below = Decimal(tier.up_to)
    return total
