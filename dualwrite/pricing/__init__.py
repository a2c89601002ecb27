"""Price math: what a Stripe price bills for a period's usage, in the currency's smallest unit.

Everything is exact (``int`` and ``Decimal``, never ``float``) and follows Stripe's documentation:

* ``billing_scheme=per_unit``: the quantity times ``unit_amount_decimal`` (or ``unit_amount``).
  ``transform_quantity`` first divides the quantity by ``divide_by`` and rounds the result ``up``
  or ``down`` to a whole number (package pricing: 150 minutes at 10 USD an hour, rounded up, is
  3 hours, 30 USD; docs.stripe.com/billing/subscriptions/usage-based/manage-billing-setup,
  "Transform quantities"). Stripe refuses ``transform_quantity`` together with ``tiers``.
* ``billing_scheme=tiered``: ``tiers_mode=volume`` bills every unit at the unit amount of the tier
  the whole quantity falls in, plus that tier's flat amount; ``graduated`` bills the units in each
  tier at that tier's unit amount, plus the flat amount of every tier the quantity reaches. A tier
  ends at ``up_to`` inclusive (``null`` in a price object, ``inf`` when creating one: the last
  tier). A quantity of 0 still bills the first tier's flat amount, whatever the mode
  (docs.stripe.com/products-prices/pricing-models, "Tiered pricing").
* Decimal unit amounts (``unit_amount_decimal``, ``flat_amount_decimal``: up to 12 decimal places,
  in the smallest unit) make a fractional total, which Stripe rounds "to the nearest whole cent"
  (docs.stripe.com/billing/subscriptions/usage-based/manage-billing-setup, "Decimal amounts"); a
  half rounds up, as Stripe's documented commercial rounding of tax amounts does
  (docs.stripe.com/billing/taxes/tax-rates#rounding). The rounding applies once, to the line's
  total (one line per price and period), never per unit or per tier.

The quantity a price bills comes from the period's raw usage by the price's aggregation: a legacy
price's ``recurring.aggregate_usage`` (``sum``, ``max``, ``last_during_period``, ``last_ever``;
docs.stripe.com/api/prices/object, ``recurring.aggregate_usage``, at 2025-02-24.acacia) over its
usage records, or a meter's ``default_aggregation.formula`` (``sum``, ``count``, ``last``) over its
meter events (docs.stripe.com/billing/subscriptions/usage-based/use-cases/pay-as-you-go).
"""

from __future__ import annotations

from dualwrite.pricing._currency import format_amount, minor_units
from dualwrite.pricing._price import ROUNDING, Price, Tier, Transform, decimal_text
from dualwrite.pricing._usage import (
    AGGREGATE_USAGE,
    METER_FORMULAS,
    MeterEvent,
    UsageRecord,
    billed_legacy_usage,
    billed_meter_usage,
)

__all__ = [
    "AGGREGATE_USAGE",
    "METER_FORMULAS",
    "ROUNDING",
    "MeterEvent",
    "Price",
    "Tier",
    "Transform",
    "UsageRecord",
    "billed_legacy_usage",
    "billed_meter_usage",
    "decimal_text",
    "format_amount",
    "minor_units",
]
