"""Stripe objects for the benchmarks, made on the stand-in through the official SDK, and the stand-in
itself as a child process."""

from __future__ import annotations

import stripe

from dualwrite.config import DEFAULT_LEGACY_API_VERSION
from dualwrite.testing import legacy_price_params, meter_params

KEY = "sk_test_dualwriteBench000000000000001"
EVENT_NAME = "api_requests"
#: The usage route the app benchmarks configure: ``POST /usage/{customer}`` with ``item`` and
#: ``quantity`` in a JSON body.
USAGE_ROUTE = {
    "method": "POST",
    "path": "/usage/{customer}",
    "customer": "path:customer",
    "subscription_item": "json:item",
    "quantity": "json:quantity",
    "event_name": f"const:{EVENT_NAME}",
}
LEGACY_VERSION = DEFAULT_LEGACY_API_VERSION


def run_standin(port: int, latency: float) -> None:
    """Child: the stand-in under uvicorn, quiet, answering after ``latency`` seconds."""
    import uvicorn

    from dualwrite.testing import StripeStandin

    standin = StripeStandin(api_keys=[KEY], latency_seconds=latency)
    uvicorn.run(standin.app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class Catalog:
    """A meter and a legacy metered price on the stand-in; customers subscribed to that price."""

    def __init__(self, url: str) -> None:
        self.client = stripe.StripeClient(KEY, base_addresses={"api": url, "meter_events": url})
        self.meter = self.client.v1.billing.meters.create(meter_params(EVENT_NAME)).id
        product = self.client.v1.products.create({"name": "API"})
        self.legacy_price = self.client.v1.prices.create(
            legacy_price_params(product.id), {"stripe_version": LEGACY_VERSION}
        ).id

    def customer(self, name: str = "Bench") -> tuple[str, str]:
        """A new customer on the legacy price: (customer id, subscription item id)."""
        customer = self.client.v1.customers.create({"name": name}).id
        subscription = self.client.v1.subscriptions.create(
            {"customer": customer, "items": [{"price": self.legacy_price}]},
            {"stripe_version": LEGACY_VERSION},
        )
        return customer, str(subscription["items"]["data"][0]["id"])

    def customers(self, count: int) -> list[str]:
        """``count`` new customers without subscriptions (meter events need only the customer)."""
        return [
            self.client.v1.customers.create({"name": f"Bench {index}"}).id for index in range(count)
        ]
