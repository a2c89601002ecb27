"""Shared helpers for the stand-in's tests: constants, the migration scenario, usage records."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
import stripe

API_KEY = "sk_test_standin_0123456789abcdef"
ACACIA = "2025-02-24.acacia"
BASIL = "2025-03-31.basil"
START = 1_736_942_400
"""2025-01-15T12:00:00Z: the stand-in's clock starts here in every test."""
MONTH_LATER = 1_739_620_800
"""2025-02-15T12:00:00Z: the start of the second monthly period."""

SDK_WARNING = pytest.mark.filterwarnings(
    "ignore:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning"
)
"""stripe-python 16.1's ``HTTPXClient`` passes the encoded form as ``data=``, which httpx 0.28
deprecates; with ``filterwarnings = error`` every SDK call would fail without this filter."""


@dataclass(frozen=True)
class Scenario:
    """Ids of one customer set up like a team mid-migration: a legacy item and a meter."""

    customer: str
    product: str
    legacy_price: str
    meter_price: str
    meter: str
    event_name: str
    subscription: str
    item: str


def legacy_price_params(product: str, aggregate_usage: str, *, unit_amount: int = 1) -> Any:
    """Parameters of a legacy metered price; stripe-python 16's typed params no longer know
    ``aggregate_usage`` (basil removed it), hence ``Any``."""
    return {
        "currency": "usd",
        "product": product,
        "unit_amount": unit_amount,
        "recurring": {
            "interval": "month",
            "usage_type": "metered",
            "aggregate_usage": aggregate_usage,
        },
    }


async def make_scenario(client: stripe.StripeClient, event_name: str = "api_calls") -> Scenario:
    """Create customer, product, a legacy ``sum`` price, a meter, its price and a subscription."""
    customer = await client.v1.customers.create_async({"name": "Ada", "email": "ada@example.com"})
    product = await client.v1.products.create_async({"name": "API calls"})
    legacy = await client.v1.prices.create_async(
        legacy_price_params(product.id, "sum", unit_amount=2)
    )
    meter = await client.v1.billing.meters.create_async(
        {
            "display_name": "API calls",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    meter_price = await client.v1.prices.create_async(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount_decimal": Decimal("2"),
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    subscription = await client.v1.subscriptions.create_async(
        {"customer": customer.id, "items": [{"price": legacy.id}]}
    )
    return Scenario(
        customer=customer.id,
        product=product.id,
        legacy_price=legacy.id,
        meter_price=meter_price.id,
        meter=meter.id,
        event_name=event_name,
        subscription=subscription.id,
        item=subscription["items"]["data"][0]["id"],
    )


async def usage_record(
    client: stripe.StripeClient,
    item: str,
    quantity: int,
    *,
    timestamp: int | str = "now",
    action: str = "increment",
    version: str = ACACIA,
    idempotency_key: str | None = None,
) -> stripe.StripeObject:
    """Create a legacy usage record the way stripe-python 12+ must: ``raw_request``."""
    options: dict[str, str] = {"stripe_version": version}
    if idempotency_key is not None:
        options["idempotency_key"] = idempotency_key
    response = await client.raw_request_async(
        "post",
        f"/v1/subscription_items/{item}/usage_records",
        quantity=quantity,
        timestamp=timestamp,
        action=action,
        **options,
    )
    return client.deserialize(response, api_mode="V1")


async def usage_summaries(client: stripe.StripeClient, item: str) -> list[dict[str, Any]]:
    """``usage_record_summaries`` of an item, newest period first (as dualwrite's reconcile
    reads them: ``raw_request`` with a pre-basil version)."""
    response = await client.raw_request_async(
        "get", f"/v1/subscription_items/{item}/usage_record_summaries", stripe_version=ACACIA
    )
    return [s.to_dict() for s in client.deserialize(response, api_mode="V1")["data"]]


def v2_event(
    scenario: Scenario,
    value: str = "1",
    *,
    identifier: str | None = None,
    customer: str | None = None,
    event_name: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """One meter event as the v2 stream takes it (``timestamp`` is an ISO 8601 string there)."""
    event: dict[str, Any] = {
        "event_name": event_name or scenario.event_name,
        "payload": {"stripe_customer_id": customer or scenario.customer, "value": value},
    }
    if identifier is not None:
        event["identifier"] = identifier
    if timestamp is not None:
        event["timestamp"] = timestamp
    return event


async def new_session_token(client: stripe.StripeClient) -> str:
    """A fresh meter event session's token, made through the SDK with the secret key."""
    session = await client.v2.billing.meter_event_session.create_async()
    return session.authentication_token


async def stream_events(
    client: stripe.StripeClient, token: str, events: list[dict[str, Any]]
) -> None:
    """Send ``events`` on the v2 meter event stream through the SDK, authenticated by ``token``."""
    params: Any = {"events": events}
    await client.v2.billing.meter_event_stream.create_async(params, {"api_key": token})
