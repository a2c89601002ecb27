"""The Stripe calls of ``meters plan|apply`` and ``backfill``, on the official SDK, in one place.

Prices are listed at the pinned pre-basil ``legacy_api_version``: ``recurring.aggregate_usage``
exists only there. Lists are read with the SDK's async auto-pagination. Stripe's exceptions become
``MigrationStripeError`` here, once, carrying the ``StripeFailure`` (secrets masked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import stripe

from dualwrite.config import StripeSettings
from dualwrite.exceptions import DualwriteError
from dualwrite.models import StripeFailure
from dualwrite.stripe_io import failure_from_exception
from dualwrite.stripe_io._http import PooledAIOHTTPClient

__all__ = ["LegacyPrice", "MigrationStripe", "MigrationStripeError", "StripeMeter"]


class MigrationStripeError(DualwriteError):
    """Stripe refused a call of a migration command (or the network failed); ``failure`` says how."""

    def __init__(self, message: str, *, failure: StripeFailure):
        super().__init__(message)
        self.failure = failure


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


@dataclass(frozen=True, slots=True)
class StripeMeter:
    """An existing billing meter."""

    id: str
    event_name: str
    formula: str
    status: str
    customer_key: str
    value_key: str


class MigrationStripe:
    """The SDK client of one migration command, with the account's key.

    Args:
        settings: where Stripe is.
        api_key: the account's secret key (never logged).
    """

    def __init__(self, settings: StripeSettings, *, api_key: str):
        self._settings = settings
        self._http = PooledAIOHTTPClient(
            timeout=settings.timeout,
            max_connections=8,
            verify_tls=settings.api_base.startswith("https://"),
        )
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": settings.api_base},
            http_client=self._http,
            max_network_retries=2,
        )
        self.calls = 0
        """How many calls (pages included) this client made."""

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.close_async()

    async def __aenter__(self) -> MigrationStripe:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def legacy_prices(self) -> AsyncIterator[LegacyPrice]:
        """Every legacy metered price of the account (active or not), newest first."""
        options: dict[str, Any] = {"stripe_version": self._settings.legacy_api_version}
        products: dict[str, str | None] = {}
        try:
            self.calls += 1
            page = await self._client.v1.prices.list_async(
                {"type": "recurring", "limit": 100},
                options,  # type: ignore[arg-type]
            )
            async for price in page.auto_paging_iter():
                body = price.to_dict()
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
                )
        except stripe.StripeError as exc:
            raise _error("GET /v1/prices", exc) from exc

    async def _product_name(self, product: str) -> str | None:
        self.calls += 1
        found = await self._client.v1.products.retrieve_async(product)
        name = found.to_dict().get("name")
        return str(name) if name else None

    async def meters(self) -> list[StripeMeter]:
        """Every billing meter of the account."""
        found: list[StripeMeter] = []
        try:
            self.calls += 1
            page = await self._client.v1.billing.meters.list_async({"limit": 100})
            async for meter in page.auto_paging_iter():
                body = meter.to_dict()
                found.append(
                    StripeMeter(
                        id=str(body["id"]),
                        event_name=str(body.get("event_name") or ""),
                        formula=str((body.get("default_aggregation") or {}).get("formula") or ""),
                        status=str(body.get("status") or "active"),
                        customer_key=str(
                            (body.get("customer_mapping") or {}).get("event_payload_key") or ""
                        ),
                        value_key=str(
                            (body.get("value_settings") or {}).get("event_payload_key") or ""
                        ),
                    )
                )
        except stripe.StripeError as exc:
            raise _error("GET /v1/billing/meters", exc) from exc
        return found

    async def create_meter(self, params: dict[str, Any], *, idempotency_key: str) -> StripeMeter:
        """Create a meter (``params`` as ``POST /v1/billing/meters`` takes them)."""
        try:
            self.calls += 1
            created = await self._client.v1.billing.meters.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            raise _error("POST /v1/billing/meters", exc) from exc
        body = created.to_dict()
        return StripeMeter(
            id=str(body["id"]),
            event_name=str(body["event_name"]),
            formula=str(body["default_aggregation"]["formula"]),
            status=str(body.get("status") or "active"),
            customer_key=str(body["customer_mapping"]["event_payload_key"]),
            value_key=str(body["value_settings"]["event_payload_key"]),
        )

    async def customer_exists(self, customer: str) -> bool:
        """Whether ``customer`` names a customer of the account (a deleted one does not)."""
        try:
            self.calls += 1
            found = await self._client.v1.customers.retrieve_async(customer)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return False
            raise _error(f"GET /v1/customers/{customer}", exc) from exc
        except stripe.StripeError as exc:
            raise _error(f"GET /v1/customers/{customer}", exc) from exc
        return not found.to_dict().get("deleted")


def _error(call: str, exc: stripe.StripeError) -> MigrationStripeError:
    failure = failure_from_exception(exc)
    code = failure.code or failure.type
    msg = f"{call}: Stripe answered {failure.http_status or 'network error'} {code}: "
    return MigrationStripeError(msg + failure.message, failure=failure)
