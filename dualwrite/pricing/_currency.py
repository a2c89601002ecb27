"""Currencies for people: how many decimals the smallest unit has, and amounts written out."""

from __future__ import annotations

from decimal import Decimal

__all__ = ["format_amount", "minor_units"]

#: Currencies whose smallest unit is the unit itself, and those with three decimals
#: (docs.stripe.com/currencies, "Zero-decimal currencies", "Three-decimal currencies").
_ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"}
    | {"pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
_THREE_DECIMAL = frozenset(("bhd", "jod", "kwd", "omr", "tnd"))


def minor_units(currency: str) -> int:
    """How many decimals the currency's smallest unit has (2 for ``usd``, 0 for ``jpy``)."""
    code = currency.lower()
    return 0 if code in _ZERO_DECIMAL else 3 if code in _THREE_DECIMAL else 2


def format_amount(amount: int, currency: str, *, signed: bool = False) -> str:
    """An amount in the smallest unit for people: ``format_amount(-4, "usd")`` is ``-0.04 USD``."""
    digits = minor_units(currency)
    value = Decimal(amount).scaleb(-digits)
    text = f"{value:+,.{digits}f}" if signed else f"{value:,.{digits}f}"
    return f"{text} {currency.upper()}"
