"""Helpers shared by the test modules: settings for a test, and a Stripe scenario built through the SDK."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import stripe
from pydantic import SecretStr

from dualwrite.config import MeterMapping, Settings, UsageRoute
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore
from dualwrite.models import Stage, UsageEvent

LEGACY_VERSION = "2025-02-24.acacia"
EVENT_NAME = "api_requests"


def make_settings(
    *,
    redis_url: str,
    prefix: str,
    api_base: str,
    api_key: str | None,
    routes: tuple[dict[str, Any], ...] = (),
    **sections: dict[str, Any],
) -> Settings:
    """Settings for one test: its own key prefix, the stand-in, fast retries."""
    outbox = {"backoff_base": 0.01, "backoff_max": 0.05, "block_ms": 20, "claim_idle_seconds": 0.2}
    outbox.update(sections.pop("outbox", {}))
    stripe_section = {"api_base": api_base, "timeout": 2.0}
    stripe_section.update(sections.pop("stripe", {}))
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": prefix, **sections.pop("redis", {})},
        "stripe": stripe_section,
        "outbox": outbox,
        "routes": tuple(UsageRoute.model_validate(route) for route in routes),
        "meters": (MeterMapping(event_name=EVENT_NAME),),
        "STRIPE_API_KEY": SecretStr(api_key) if api_key else None,
        **sections,
    }
    return Settings(**data)


@dataclass
class Scenario:
    """Stripe objects for one customer on a legacy metered price."""

    customer: str
    subscription: str
    item: str
    legacy_price: str
    meter_price: str
    meter: str


class ScenarioBuilder:
    """Builds customers with subscriptions on the stand-in through the official SDK."""

    def __init__(self, url: str, api_key: str):
        self.http = stripe.HTTPXClient()
        self.client = stripe.StripeClient(
            api_key, base_addresses={"api": url, "meter_events": url}, http_client=self.http
        )
        self._prices: tuple[str, str, str] | None = None

    async def aclose(self) -> None:
        """Close the SDK's connections."""
        await self.http.close_async()  # type: ignore[no-untyped-call]

    async def _catalog(self) -> tuple[str, str, str]:
        if self._prices is None:
            meter = await self.client.v1.billing.meters.create_async(
                {
                    "display_name": "API requests",
                    "event_name": EVENT_NAME,
                    "default_aggregation": {"formula": "sum"},
                }
            )
            product = await self.client.v1.products.create_async({"name": "API"})
            legacy = await self.client.v1.prices.create_async(
                # aggregate_usage is gone from stripe-python 16's typed params (removed in basil).
                cast(
                    Any,
                    {
                        "currency": "usd",
                        "product": product.id,
                        "unit_amount": 1,
                        "recurring": {
                            "interval": "month",
                            "usage_type": "metered",
                            "aggregate_usage": "sum",
                        },
                    },
                ),
                {"stripe_version": LEGACY_VERSION},
            )
            metered = await self.client.v1.prices.create_async(
                {
                    "currency": "usd",
                    "product": product.id,
                    "unit_amount": 1,
                    "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
                }
            )
            self._prices = (legacy.id, metered.id, meter.id)
        return self._prices

    async def customer(self, name: str = "Test customer") -> Scenario:
        """A new customer subscribed to the legacy metered price."""
        legacy, metered, meter = await self._catalog()
        customer = await self.client.v1.customers.create_async({"name": name})
        subscription = await self.client.v1.subscriptions.create_async(
            {"customer": customer.id, "items": [{"price": legacy}]},
            {"stripe_version": LEGACY_VERSION},
        )
        item = subscription["items"]["data"][0]["id"]
        return Scenario(customer.id, subscription.id, item, legacy, metered, meter)

    async def move_to_meter_price(self, scenario: Scenario) -> None:
        """Move the item to the meter-backed price (what a cutover does at the period boundary)."""
        await self.client.v1.subscription_items.update_async(
            scenario.item, {"price": scenario.meter_price}
        )


async def set_stage(engine: DualWriteEngine, customer: str, stage: Stage) -> None:
    """Pin a customer to a stage and drop the engine's cached resolution."""
    store = RedisFlagStore(engine.redis, engine.keys)
    await store.set_override(customer, stage, actor="tests", reason="test set-up")
    invalidate = getattr(engine.resolver, "invalidate", None)
    if invalidate is not None:
        invalidate(customer)


def usage(
    scenario: Scenario,
    quantity: int = 5,
    *,
    identifier: str | None = None,
    action: str = "increment",
    timestamp: int | None = None,
) -> UsageEvent:
    """A usage event for the scenario's customer and item."""
    return UsageEvent(
        identifier=identifier or f"test-{time.time_ns()}",
        identifier_source="idempotency_key" if identifier else "minted",
        customer=scenario.customer,
        subscription_item=scenario.item,
        event_name=EVENT_NAME,
        quantity=quantity,
        timestamp=timestamp or int(time.time()),
        action=action,
    )
