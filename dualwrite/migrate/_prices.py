"""The meter-backed price of each legacy metered price: one that bills the same.

"The same" is ``Price.differences`` empty: same currency, interval, billing scheme, unit amount,
tiers (mode, bounds, unit and flat amounts) and ``transform_quantity``; only the meter replaces
``aggregate_usage``. For each legacy price the plan, first rule that applies:

1. the price ``[[meters]] meter_prices`` already maps to it: kept when it is meter-backed, on the
   meter of that event name, and bills the same (``exists``); refused with the differences otherwise;
2. an existing price on that meter billing the same (one ``meters apply`` created first: its
   ``metadata[dualwrite_replaces]`` names the legacy price): reused (``exists``);
3. else a new one (``create``): the legacy price's billing terms, its product and nickname, the
   meter, and ``metadata[dualwrite_replaces]``. The Idempotency-Key is derived from the legacy price,
   the event name and the parameters, so a retried apply creates it once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dualwrite.migrate._stripe import REPLACES, LegacyPrice, MeterPrice
from dualwrite.pricing import Price

__all__ = ["PlannedPrice", "plan_price"]

PriceAction = Literal["create", "exists", "refused"]

#: Where the meter's id goes in a planned price's parameters before the meter exists.
METER_PLACEHOLDER = "(the meter)"


class PlannedPrice(BaseModel):
    """The meter-backed price that replaces one legacy metered price."""

    model_config = ConfigDict(frozen=True)

    legacy_price: str
    action: PriceAction
    price_id: str | None = None
    """The existing meter-backed price (``exists``)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """``POST /v1/prices`` parameters (``create``), the meter left to fill in."""
    terms: str = ""
    """What the price bills, in short (``per_unit 0.5 usd a unit, every 1 month``)."""
    reason: str = ""

    def idempotency_key(self, event_name: str) -> str:
        """The Idempotency-Key of its creation."""
        seed = json.dumps([self.legacy_price, event_name, self.params], sort_keys=True)
        return f"dw-price-create-{hashlib.sha256(seed.encode()).hexdigest()[:40]}"

    def create_params(self, meter: str) -> dict[str, Any]:
        """The parameters of ``POST /v1/prices``, on ``meter``."""
        params = json.loads(json.dumps(self.params))
        params["recurring"]["meter"] = meter
        return dict(params)


def _terms(price: Price) -> str:
    every = f"every {price.interval_count} {price.interval}"
    if price.billing_scheme == "tiered":
        return f"{price.tiers_mode} tiers ({len(price.tiers)}) in {price.currency}, {every}"
    amount = price.billing_terms()["unit_amount"]
    package = (
        f" per {price.transform.divide_by} ({price.transform.round})" if price.transform else ""
    )
    return f"{amount}{package} {price.currency} a unit, {every}"


def plan_price(
    legacy: LegacyPrice,
    *,
    meter: str | None,
    existing: list[MeterPrice],
    mapped: str | None,
) -> PlannedPrice:
    """The plan for ``legacy``'s meter-backed price, on ``meter`` (None: the meter is still to be
    created), given the account's ``existing`` meter-backed prices and the one ``mapped`` to it in
    the config (if any)."""
    if not isinstance(legacy.price, Price):
        reason = f"{legacy.price}: dualwrite cannot propose a price that bills the same"
        return PlannedPrice(legacy_price=legacy.id, action="refused", reason=reason)
    source = legacy.price
    if mapped is not None:
        found = next((m.price for m in existing if m.price.id == mapped), None)
        if found is None:
            reason = f"[[meters]] meter_prices maps it to {mapped}, which is no meter-backed price"
            return PlannedPrice(legacy_price=legacy.id, action="refused", reason=reason)
        if meter is not None and found.meter != meter:
            reason = f"[[meters]] meter_prices maps it to {mapped}, which bills meter {found.meter}"
            return PlannedPrice(legacy_price=legacy.id, action="refused", reason=reason)
        differences = source.differences(found)
        if differences:
            reason = f"{mapped} (mapped in [[meters]]) bills differently: {'; '.join(differences)}"
            return PlannedPrice(legacy_price=legacy.id, action="refused", reason=reason)
        return PlannedPrice(
            legacy_price=legacy.id, action="exists", price_id=mapped, terms=_terms(found)
        )
    same = [
        m
        for m in existing
        if meter is not None and m.price.meter == meter and not source.differences(m.price)
    ]
    same.sort(key=lambda m: (m.replaces != legacy.id, not m.active))
    if same:
        return PlannedPrice(
            legacy_price=legacy.id, action="exists", price_id=same[0].price.id, terms=_terms(source)
        )
    params = source.billing_params()
    params["recurring"] |= {"usage_type": "metered", "meter": METER_PLACEHOLDER}
    params |= {"product": legacy.product, "metadata": {REPLACES: legacy.id}}
    if legacy.nickname:
        params["nickname"] = legacy.nickname
    return PlannedPrice(
        legacy_price=legacy.id, action="create", params=params, terms=_terms(source)
    )
