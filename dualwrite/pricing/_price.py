"""``Price``: a Stripe price object, and the amount it bills for a quantity (see the package)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Literal

from dualwrite.exceptions import PriceError

__all__ = ["ROUNDING", "Price", "Tier", "Transform", "decimal_text"]

TiersMode = Literal["graduated", "volume"]
Round = Literal["up", "down"]

#: How a fractional total becomes a whole number of the smallest unit (see the package docstring).
ROUNDING = ROUND_HALF_UP


def decimal_text(value: Decimal) -> str:
    """A decimal as Stripe writes one (``0.05``, ``105.5``, ``2000``): no exponent, no trailing
    zeros."""
    return f"{value.normalize():f}"


def _decimal(value: object, *, price: str, field: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        msg = f"price {price}: {field} must be a number, not {value!r}"
        raise PriceError(msg)
    try:
        number = Decimal(value)
    except InvalidOperation:
        msg = f"price {price}: {field} must be a decimal number, not {value!r}"
        raise PriceError(msg) from None
    if not number.is_finite() or number < 0:
        msg = f"price {price}: {field} must be a finite amount of 0 or more, not {value!r}"
        raise PriceError(msg)
    return number


def _amount(data: Mapping[str, Any], name: str, *, price: str, field: str) -> Decimal | None:
    """``<name>_decimal`` (exact) when Stripe gives it, else the integer ``<name>``."""
    for key in (f"{name}_decimal", name):
        value = data.get(key)
        if value is not None:
            return _decimal(value, price=price, field=f"{field}{key}")
    return None


@dataclass(frozen=True, slots=True)
class Tier:
    """One tier of a tiered price; amounts in the smallest currency unit."""

    up_to: int | None
    """The last unit of the tier, inclusive (None: no end, the last tier)."""
    unit_amount: Decimal = Decimal(0)
    flat_amount: Decimal = Decimal(0)

    def params(self) -> dict[str, Any]:
        """The tier as ``POST /v1/prices`` takes it (``tiers[n][...]``)."""
        found: dict[str, Any] = {"up_to": "inf" if self.up_to is None else self.up_to}
        for name, value in (("unit_amount", self.unit_amount), ("flat_amount", self.flat_amount)):
            if value:
                found |= _amount_param(name, value)
        return found


def _amount_param(name: str, value: Decimal) -> dict[str, Any]:
    """``unit_amount`` when whole, else ``unit_amount_decimal`` (Stripe fills the other in)."""
    if value == value.to_integral_value():
        return {name: int(value)}
    return {f"{name}_decimal": decimal_text(value)}


@dataclass(frozen=True, slots=True)
class Transform:
    """``transform_quantity``: divide the quantity, then round to a whole number."""

    divide_by: int
    round: Round

    def apply(self, quantity: Decimal) -> Decimal:
        """The transformed quantity (150 minutes, divided by 60 and rounded up: 3)."""
        mode = ROUND_CEILING if self.round == "up" else ROUND_FLOOR
        return (quantity / self.divide_by).to_integral_value(rounding=mode)


@dataclass(frozen=True, slots=True)
class Price:
    """A Stripe price, as far as the amount it bills goes (``Price.from_stripe`` reads one)."""

    id: str
    currency: str
    billing_scheme: Literal["per_unit", "tiered"] = "per_unit"
    unit_amount: Decimal | None = None
    tiers_mode: TiersMode | None = None
    tiers: tuple[Tier, ...] = ()
    transform: Transform | None = None
    interval: str | None = None
    interval_count: int = 1
    usage_type: str | None = None
    aggregate_usage: str | None = None
    """``recurring.aggregate_usage`` (legacy metered prices, pre-basil API versions only)."""
    meter: str | None = None
    """``recurring.meter``: the meter a meter-backed price bills."""
    product: str | None = None
    lookup_key: str | None = None
    nickname: str | None = None

    @classmethod
    def from_stripe(cls, data: Mapping[str, Any]) -> Price:
        """Read a ``price`` object as Stripe returns it (``tiers`` is only there when the request
        asked for it: ``expand[]=tiers``).

        Raises:
            PriceError: a field is missing or outside what Stripe allows; the message names it.
        """
        price = str(data.get("id") or "?")
        currency = data.get("currency")
        if not isinstance(currency, str) or len(currency) != 3:
            msg = f"price {price}: currency must be a three-letter code, not {currency!r}"
            raise PriceError(msg)
        recurring = data.get("recurring") or {}
        product = data.get("product")
        if isinstance(product, Mapping):  # expanded
            product = product.get("id")
        common: dict[str, Any] = {
            "id": price,
            "currency": currency.lower(),
            "interval": recurring.get("interval"),
            "interval_count": int(recurring.get("interval_count") or 1),
            "usage_type": recurring.get("usage_type"),
            "aggregate_usage": recurring.get("aggregate_usage"),
            "meter": recurring.get("meter") or None,
            "product": str(product) if product else None,
            "lookup_key": data.get("lookup_key") or None,
            "nickname": data.get("nickname") or None,
        }
        if data.get("custom_unit_amount") and any(dict(data["custom_unit_amount"]).values()):
            msg = f"price {price}: custom_unit_amount (customer-chosen amounts) bills no usage"
            raise PriceError(msg)
        transform = _transform(data.get("transform_quantity"), price=price)
        scheme = data.get("billing_scheme") or "per_unit"
        if scheme == "per_unit":
            amount = _amount(data, "unit_amount", price=price, field="")
            if amount is None:
                msg = f"price {price}: a per_unit price needs unit_amount or unit_amount_decimal"
                raise PriceError(msg)
            return cls(unit_amount=amount, transform=transform, **common)
        if scheme != "tiered":
            msg = f"price {price}: billing_scheme must be per_unit or tiered, not {scheme!r}"
            raise PriceError(msg)
        if transform is not None:
            msg = f"price {price}: Stripe does not combine transform_quantity with tiers"
            raise PriceError(msg)
        mode = data.get("tiers_mode")
        if mode not in ("graduated", "volume"):
            msg = (
                f"price {price}: a tiered price needs tiers_mode graduated or volume, not {mode!r}"
            )
            raise PriceError(msg)
        return cls(
            billing_scheme="tiered",
            tiers_mode=mode,
            tiers=_tiers(data.get("tiers"), price=price),
            **common,
        )

    # ------------------------------------------------------------------------------ amounts

    def exact_amount(self, quantity: int | Decimal) -> Decimal:
        """What the price bills for ``quantity`` (the billed quantity: usage aggregated by the
        price's ``aggregate_usage`` or its meter's formula), before rounding.

        Raises:
            PriceError: the quantity is negative or not a number.
        """
        units = _quantity(quantity, price=self.id)
        if self.billing_scheme == "per_unit":
            if self.transform is not None:
                units = self.transform.apply(units)
            return units * (self.unit_amount or 0)
        if self.tiers_mode == "volume":
            return _volume(self.tiers, units)
        return _graduated(self.tiers, units)

    def amount(self, quantity: int | Decimal) -> int:
        """What the price bills for ``quantity``, in the currency's smallest unit: the exact
        amount rounded once, a half up.

        Raises:
            PriceError: the quantity is negative or not a number.
        """
        return int(self.exact_amount(quantity).to_integral_value(rounding=ROUNDING))

    # ---------------------------------------------------------------------- comparing prices

    def billing_terms(self) -> dict[str, object]:
        """What decides the amount billed for a quantity, and when: currency, interval, scheme,
        unit amount, tiers and transform (not the aggregation, nor the meter)."""
        return {
            "currency": self.currency,
            "interval": f"{self.interval_count} {self.interval}",
            "billing_scheme": self.billing_scheme,
            "unit_amount": None if self.unit_amount is None else decimal_text(self.unit_amount),
            "tiers_mode": self.tiers_mode,
            "tiers": [tier.params() for tier in self.tiers],
            "transform_quantity": None
            if self.transform is None
            else {"divide_by": self.transform.divide_by, "round": self.transform.round},
        }

    def differences(self, other: Price) -> list[str]:
        """How ``other`` bills differently from this price (empty: the same amount for every
        quantity, in the same currency, over the same interval)."""
        mine, theirs = self.billing_terms(), other.billing_terms()
        return [
            f"{name} {theirs[name]!r} (not {mine[name]!r})"
            for name in mine
            if mine[name] != theirs[name]
        ]

    def billing_params(self) -> dict[str, Any]:
        """The parameters of ``POST /v1/prices`` that bill like this price (currency, interval,
        scheme, amounts, tiers, transform), for a new price of another kind to start from."""
        params: dict[str, Any] = {
            "currency": self.currency,
            "billing_scheme": self.billing_scheme,
            "recurring": {"interval": self.interval, "interval_count": self.interval_count},
        }
        if self.billing_scheme == "per_unit":
            params |= _amount_param("unit_amount", self.unit_amount or Decimal(0))
        else:
            params["tiers_mode"] = self.tiers_mode
            params["tiers"] = [tier.params() for tier in self.tiers]
        if self.transform is not None:
            params["transform_quantity"] = {
                "divide_by": self.transform.divide_by,
                "round": self.transform.round,
            }
        return params


def _transform(data: object, *, price: str) -> Transform | None:
    if not data:
        return None
    if not isinstance(data, Mapping):
        msg = f"price {price}: transform_quantity must be an object"
        raise PriceError(msg)
    divide_by, rounding = data.get("divide_by"), data.get("round")
    if isinstance(divide_by, bool) or not isinstance(divide_by, int) or divide_by < 1:
        msg = f"price {price}: transform_quantity.divide_by must be a whole number of 1 or more"
        raise PriceError(msg)
    if rounding not in ("up", "down"):
        msg = f"price {price}: transform_quantity.round must be up or down, not {rounding!r}"
        raise PriceError(msg)
    return Transform(divide_by=divide_by, round=rounding)


def _tiers(data: object, *, price: str) -> tuple[Tier, ...]:
    if not isinstance(data, list) or not data:
        msg = (
            f"price {price}: a tiered price's tiers are missing; read it with expand[]=tiers "
            "(Stripe leaves them out otherwise)"
        )
        raise PriceError(msg)
    tiers: list[Tier] = []
    last = 0
    for index, entry in enumerate(data):
        field = f"tiers[{index}]."
        if not isinstance(entry, Mapping):
            msg = f"price {price}: {field[:-1]} must be an object"
            raise PriceError(msg)
        up_to = entry.get("up_to")
        if up_to in (None, "inf"):
            up_to = None
        elif isinstance(up_to, bool) or not isinstance(up_to, int) or up_to <= last:
            msg = f"price {price}: {field}up_to must be a whole number above {last}, or inf"
            raise PriceError(msg)
        if up_to is None and index != len(data) - 1:
            msg = f"price {price}: only the last tier may have up_to inf"
            raise PriceError(msg)
        if up_to is not None and index == len(data) - 1:
            msg = f"price {price}: the last tier must have up_to inf"
            raise PriceError(msg)
        unit = _amount(entry, "unit_amount", price=price, field=field)
        flat = _amount(entry, "flat_amount", price=price, field=field)
        if unit is None and flat is None:
            msg = f"price {price}: {field[:-1]} needs a unit amount, a flat amount or both"
            raise PriceError(msg)
        tiers.append(
            Tier(up_to=up_to, unit_amount=unit or Decimal(0), flat_amount=flat or Decimal(0))
        )
        last = up_to or last
    return tuple(tiers)


def _quantity(quantity: int | Decimal, *, price: str) -> Decimal:
    if isinstance(quantity, bool) or not isinstance(quantity, int | Decimal):
        msg = f"price {price}: a quantity must be an int or a Decimal, not {quantity!r}"
        raise PriceError(msg)
    units = Decimal(quantity)
    if not units.is_finite() or units < 0:
        msg = f"price {price}: cannot bill a quantity of {quantity}"
        raise PriceError(msg)
    return units


def _volume(tiers: tuple[Tier, ...], units: Decimal) -> Decimal:
    """Every unit at the unit amount of the tier the whole quantity falls in, plus its flat fee."""
    tier = next(t for t in tiers if t.up_to is None or units <= t.up_to)
    return tier.flat_amount + tier.unit_amount * units


def _graduated(tiers: tuple[Tier, ...], units: Decimal) -> Decimal:
    """The units in each tier at that tier's amount, plus the flat fee of each tier reached (the
    first one always, so that a quantity of 0 bills the first flat fee)."""
    total = Decimal(0)
    lower = 0
    for index, tier in enumerate(tiers):
        if index and units <= lower:
            break
        upper = units if tier.up_to is None else min(units, Decimal(tier.up_to))
        total += tier.flat_amount + tier.unit_amount * max(upper - lower, Decimal(0))
        if tier.up_to is None:
            break
        lower = tier.up_to
    return total
