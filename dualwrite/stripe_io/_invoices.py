"""Stripe's invoice previews (``POST /v1/invoices/create_preview``), read into plain values.

A preview of a price swap sends ``subscription_details[items][n][id]`` and ``[price]`` for each
swapped item, with ``subscription_details[proration_behavior]=none`` so that the preview holds the
period's usage under the new price and no proration lines. Line items are read in both shapes
Stripe has used: before basil a line names its ``subscription_item`` and ``price`` itself; from
basil on, under ``parent.subscription_item_details`` and ``pricing.price_details``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dualwrite.stripe_io._failures import as_dict

__all__ = ["InvoicePreview", "PreviewLine", "preview_from", "swap_params"]


@dataclass(frozen=True, slots=True)
class PreviewLine:
    """One line of a previewed invoice."""

    subscription_item: str | None
    price: str | None
    amount: int
    """In the currency's smallest unit, before discounts and taxes."""
    quantity: int | None
    period_start: int | None
    period_end: int | None


@dataclass(frozen=True, slots=True)
class InvoicePreview:
    """A previewed invoice: its currency, subtotal and lines (the first page Stripe returns)."""

    currency: str
    subtotal: int
    lines: tuple[PreviewLine, ...]
    complete: bool
    """False when Stripe has more lines than it returned (``lines.has_more``)."""

    def amount_for(self, item: str, *, price: str | None = None) -> int | None:
        """What the preview bills for subscription item ``item`` (at ``price``, if given): the sum
        of its lines, or None when no line is the item's."""
        found = [
            line.amount
            for line in self.lines
            if line.subscription_item == item and (price is None or line.price == price)
        ]
        return sum(found) if found else None


def swap_params(swap: Mapping[str, str]) -> dict[str, Any]:
    """``subscription_details`` swapping the price of each item of ``swap`` (item → price)."""
    return {
        "items": [{"id": item, "price": price} for item, price in swap.items()],
        "proration_behavior": "none",
    }


def _text(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("id")
    return str(value) if value else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _line(entry: Mapping[str, Any]) -> PreviewLine:
    parent = as_dict(as_dict(entry.get("parent")).get("subscription_item_details"))
    pricing = as_dict(as_dict(entry.get("pricing")).get("price_details"))
    period = as_dict(entry.get("period"))
    return PreviewLine(
        subscription_item=_text(entry.get("subscription_item") or parent.get("subscription_item")),
        price=_text(entry.get("price") or pricing.get("price")),
        amount=_int(entry.get("amount")) or 0,
        quantity=_int(entry.get("quantity")),
        period_start=_int(period.get("start")),
        period_end=_int(period.get("end")),
    )


def preview_from(data: Mapping[str, Any]) -> InvoicePreview:
    """An ``invoice`` object (a preview) as an ``InvoicePreview``."""
    lines = as_dict(data.get("lines"))
    return InvoicePreview(
        currency=str(data.get("currency") or ""),
        subtotal=_int(data.get("subtotal")) or 0,
        lines=tuple(_line(as_dict(entry)) for entry in lines.get("data") or []),
        complete=not lines.get("has_more"),
    )
