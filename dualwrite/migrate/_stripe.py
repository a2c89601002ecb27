"""The Stripe calls of ``meters plan|apply`` and ``backfill``, on the official SDK, in one place.

Prices are listed at the pinned pre-basil ``legacy_api_version`` (``recurring.aggregate_usage``
exists only there), with their tiers (``expand[]=data.tiers``); the rest go at the SDK's own
version. ``AccountStripe`` (``dualwrite.stripe_io``)
makes the calls, reads lists page by page and raises ``MigrationStripeError`` carrying the
``StripeFailure`` (secrets masked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dualwrite.config import StripeSettings
from dualwrite.exceptions import MigrationStripeError, PriceError
from dualwrite.pricing import Price
from dualwrite.stripe_io import AccountStripe

__all__ = ["LegacyPrice", "MeterPrice", "MigrationStripe", "MigrationStripeError", "StripeMeter"]

#: The metadata key naming, on a meter-backed price ``meters apply`` created, the legacy price it
#: replaces.
REPLACES = "dualwrite_replaces"


@dataclass(frozen=True, slots=True)
class LegacyPrice:
    """A legacy metered price: ``usage_type=metered`` and no meter."""

    id: str
    product: str
    product_name: str | None
    lookup_key: str | None
    nickname: str | None
    aggregate_usage: str
    interval: str
    active: bool
    price: Price | PriceError
    """What it bills (its tiers included), or why dualwrite cannot say."""


@dataclass(frozen=True, slots=True)
class MeterPrice:
    """A meter-backed price: what it bills, and the legacy price it replaces (``meters apply``
    names it in the metadata)."""

    price: Price
    replaces: str | None
    active: bool


@dataclass(frozen=True, slots=True)
class StripeMeter:
    """An existing billing meter."""

    id: str
    event_name: str
    formula: str
    status: str
    customer_key: str
    value_key: str


class MigrationStripe(AccountStripe):
    """The Stripe calls of one migration command, with the account's key.

    Args:
        settings: where Stripe is.
        api_key: the account's secret key (never logged).
    """

    error = MigrationStripeError

    def __init__(self, settings: StripeSettings, *, api_key: str):
        super().__init__(settings, api_key=api_key, max_connections=8)

    async def legacy_prices(self) -> AsyncIterator[LegacyPrice]:
        """Every legacy metered price of the account (active or not), newest first."""
        products: dict[str, str | None] = {}
        async for body in self.list_all("/v1/prices", type="recurring", expand=["data.tiers"]):
            recurring = body.get("recurring") or {}
            if recurring.get("usage_type") != "metered" or recurring.get("meter"):
                continue
            product = str(body.get("product") or "")
            if product and product not in products:
                products[product] = await self._product_name(product)
            yield LegacyPrice(
                id=str(body["id"]),
                product=product,
                product_name=products.get(product),
                lookup_key=body.get("lookup_key") or None,
                nickname=body.get("nickname") or None,
                aggregate_usage=str(recurring.get("aggregate_usage") or "sum"),
                interval=str(recurring.get("interval") or ""),
                active=bool(body.get("active", True)),
                price=_parsed(body),
            )

    async def meter_prices(self) -> list[MeterPrice]:
        """Every meter-backed price of the account (active or not) that dualwrite can bill."""
        found: list[MeterPrice] = []
        async for body in self.list_all("/v1/prices", type="recurring", expand=["data.tiers"]):
            parsed = _parsed(body)
            if isinstance(parsed, Price) and parsed.meter:
                metadata = body.get("metadata") or {}
                found.append(
                    MeterPrice(
                        price=parsed,
                        replaces=metadata.get(REPLACES) or None,
                        active=bool(body.get("active", True)),
                    )
                )
        return found

    async def create_price(self, params: dict[str, Any], *, idempotency_key: str) -> Price:
        """Create a price (``params`` as ``POST /v1/prices`` takes them), its tiers expanded."""
        created = await self.request(
            "POST",
            "/v1/prices",
            idempotency_key=idempotency_key,
            pinned=False,
            expand=["tiers"],
            **params,
        )
        parsed = _parsed(created)
        if isinstance(parsed, PriceError):
            msg = f"Stripe created a price dualwrite cannot read: {parsed}"
            raise MigrationStripeError(msg)
        return parsed

    async def _product_name(self, product: str) -> str | None:
        name = (await self.request("GET", f"/v1/products/{product}", pinned=False)).get("name")
        return str(name) if name else None

    async def meters(self) -> list[StripeMeter]:
        """Every billing meter of the account."""
        return [_meter(body) async for body in self.list_all("/v1/billing/meters", pinned=False)]

    async def create_meter(self, params: dict[str, Any], *, idempotency_key: str) -> StripeMeter:
        """Create a meter (``params`` as ``POST /v1/billing/meters`` takes them)."""
        created = await self.request(
            "POST", "/v1/billing/meters", idempotency_key=idempotency_key, pinned=False, **params
        )
        return _meter(created)

    async def customer_exists(self, customer: str) -> bool:
        """Whether ``customer`` names a customer of the account (a deleted one does not)."""
        return await self._customer(customer) is not None

    async def customer_now(self, customer: str) -> int | None:
        """The frozen time of the Stripe test clock ``customer`` lives on (Stripe judges its
        usage by it), None when it lives on none; raises as ``customer_exists`` does."""
        found = await self._customer(customer)
        clock = (found or {}).get("test_clock")
        if not clock:
            return None
        read = await self.request("GET", f"/v1/test_helpers/test_clocks/{clock}", pinned=False)
        return int(read["frozen_time"])

    async def _customer(self, customer: str) -> dict[str, Any] | None:
        """The customer as Stripe returns it; None when there is none (or it was deleted)."""
        try:
            found = await self.request("GET", f"/v1/customers/{customer}", pinned=False)
        except MigrationStripeError as exc:
            if exc.failure is not None and exc.failure.http_status == 404:
                return None
            raise
        return None if found.get("deleted") else found


def _parsed(body: dict[str, Any]) -> Price | PriceError:
    try:
        return Price.from_stripe(body)
    except PriceError as exc:
        return exc


def _meter(body: dict[str, Any]) -> StripeMeter:
    return StripeMeter(
        id=str(body["id"]),
        event_name=str(body.get("event_name") or ""),
        formula=str((body.get("default_aggregation") or {}).get("formula") or ""),
        status=str(body.get("status") or "active"),
        customer_key=str((body.get("customer_mapping") or {}).get("event_payload_key") or ""),
        value_key=str((body.get("value_settings") or {}).get("event_payload_key") or ""),
    )
