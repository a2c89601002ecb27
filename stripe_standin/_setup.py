"""The Stripe objects a scenario starts from, as request parameters: a meter and a legacy metered
price. The demo, the tests and the benchmarks create the same two through the SDK (sync or async,
so only the parameters are shared)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stripe.params.billing import MeterCreateParams

__all__ = ["legacy_price_params", "meter_params"]


def meter_params(event_name: str, display_name: str = "API requests") -> MeterCreateParams:
    """``POST /v1/billing/meters``: a ``sum`` meter for ``event_name``."""
    return {
        "display_name": display_name,
        "event_name": event_name,
        "default_aggregation": {"formula": "sum"},
    }


def legacy_price_params(product: str, *, unit_amount: int = 1) -> Any:
    """``POST /v1/prices``: a monthly metered price summing legacy usage records.

    Typed ``Any``: ``aggregate_usage`` is gone from stripe-python's typed parameters (it was
    removed in basil), so the request must be sent with the pre-basil ``stripe_version``.
    """
    return {
        "currency": "usd",
        "product": product,
        "unit_amount": unit_amount,
        "recurring": {"interval": "month", "usage_type": "metered", "aggregate_usage": "sum"},
    }
