"""The one table of what the stand-in implements: each endpoint, the parameters it takes and its handler.

``ENDPOINTS`` maps ``(method, path template)`` to an ``Endpoint``. The parameter specs here are the
only place that says which parameters an endpoint accepts and which it requires; the conformance
test reads them and compares them with Stripe's OpenAPI excerpts. Path templates name their one
variable ``{id}``. ``/v2`` endpoints take JSON bodies and say how they are authenticated: with the
secret key, or (the meter event stream) with a meter event session's token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from stripe_standin import (
    _catalog as catalog,
    _invoices as invoices,
    _meters as meters,
    _notifications as notifications,
    _schedules as schedules,
    _streams as streams,
    _test_clocks as test_clocks,
    _usage as usage,
)
from stripe_standin._params import (
    Param,
    boolean,
    date_time,
    decimal,
    expand,
    integer,
    lst,
    metadata,
    obj,
    string,
    string_map,
    timestamp,
)
from stripe_standin._state import Call, Store

__all__ = ["ENDPOINTS", "Auth", "Endpoint", "Handler", "match_endpoint"]

Handler = Callable[[Store, Call], dict[str, Any]]
"""Turns a validated call into the JSON body of a 200 reply (or raises ``StripeApiError``)."""

Auth = Literal["secret_key", "meter_session"]
"""What authenticates a call: an API key, or a meter event session's ``authentication_token``."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One implemented Stripe operation."""

    method: str
    path: str
    params: Mapping[str, Param]
    handler: Handler
    auth: Auth = "secret_key"

    @property
    def json(self) -> bool:
        """Whether the endpoint is API v2's, with JSON bodies and v2's error shape."""
        return self.path.startswith("/v2/")


_EXPAND: dict[str, Param] = {"expand": expand()}
_PAGE: dict[str, Param] = {
    "limit": integer(minimum=1, maximum=100),
    "starting_after": string(),
    "ending_before": string(),
    **_EXPAND,
}
_INTERVALS = ("day", "week", "month", "year")

_TABLE: tuple[tuple[str, str, Mapping[str, Param], Handler], ...] = (
    (
        "POST",
        "/v1/customers",
        {
            "name": string(max_length=256),
            "email": string(max_length=512),
            "description": string(),
            "phone": string(max_length=20),
            "metadata": metadata(),
            "test_clock": string(),
            **_EXPAND,
        },
        catalog.create_customer,
    ),
    (
        "GET",
        "/v1/customers",
        {"email": string(max_length=512), "test_clock": string(), **_PAGE},
        catalog.list_customers,
    ),
    ("GET", "/v1/customers/{id}", _EXPAND, catalog.retrieve_customer),
    (
        "POST",
        "/v1/products",
        {
            "name": string(required=True),
            "id": string(),
            "active": boolean(),
            "description": string(max_length=40_000),
            "metadata": metadata(),
            **_EXPAND,
        },
        catalog.create_product,
    ),
    ("GET", "/v1/products", {"active": boolean(), **_PAGE}, catalog.list_products),
    ("GET", "/v1/products/{id}", _EXPAND, catalog.retrieve_product),
    (
        "POST",
        "/v1/prices",
        {
            "currency": string(required=True),
            "product": string(),
            "product_data": obj({"name": string(required=True), "metadata": metadata()}),
            "unit_amount": integer(minimum=0),
            "unit_amount_decimal": decimal(),
            "recurring": obj(
                {
                    "interval": string(required=True, choices=_INTERVALS),
                    "interval_count": integer(minimum=1),
                    "usage_type": string(choices=("licensed", "metered")),
                    "aggregate_usage": string(
                        choices=("last_during_period", "last_ever", "max", "sum")
                    ),
                    "meter": string(),
                }
            ),
            "billing_scheme": string(choices=("per_unit", "tiered")),
            "tiers": lst(
                obj(
                    {
                        "up_to": string(required=True),  # a whole number or "inf"
                        "unit_amount": integer(minimum=0),
                        "unit_amount_decimal": decimal(),
                        "flat_amount": integer(minimum=0),
                        "flat_amount_decimal": decimal(),
                    }
                )
            ),
            "tiers_mode": string(choices=("graduated", "volume")),
            "transform_quantity": obj(
                {
                    "divide_by": integer(required=True, minimum=1),
                    "round": string(required=True, choices=("down", "up")),
                }
            ),
            "lookup_key": string(max_length=200),
            "nickname": string(),
            "active": boolean(),
            "metadata": metadata(),
            **_EXPAND,
        },
        catalog.create_price,
    ),
    (
        "GET",
        "/v1/prices",
        {
            "product": string(),
            "active": boolean(),
            "lookup_keys": lst(string(max_length=200)),
            "type": string(choices=("one_time", "recurring")),
            **_PAGE,
        },
        catalog.list_prices,
    ),
    ("GET", "/v1/prices/{id}", _EXPAND, catalog.retrieve_price),
    (
        "POST",
        "/v1/subscriptions",
        {
            "customer": string(required=True),
            "items": lst(
                obj(
                    {
                        "price": string(required=True),
                        "quantity": integer(minimum=0),
                        "metadata": metadata(),
                    }
                ),
                required=True,
            ),
            "billing_cycle_anchor": timestamp(),
            "metadata": metadata(),
            **_EXPAND,
        },
        catalog.create_subscription,
    ),
    (
        "GET",
        "/v1/subscriptions",
        {
            "customer": string(),
            "price": string(),
            "status": string(
                choices=("active", "all", "canceled", "ended", "incomplete", "past_due", "trialing")
            ),
            "test_clock": string(),
            **_PAGE,
        },
        catalog.list_subscriptions,
    ),
    ("GET", "/v1/subscriptions/{id}", _EXPAND, catalog.retrieve_subscription),
    (
        "GET",
        "/v1/subscription_items",
        {"subscription": string(required=True), **_PAGE},
        catalog.list_items,
    ),
    ("GET", "/v1/subscription_items/{id}", _EXPAND, catalog.retrieve_item),
    (
        "POST",
        "/v1/subscription_items/{id}",
        {
            "price": string(),
            "quantity": integer(minimum=0),
            "metadata": metadata(),
            "proration_behavior": string(choices=("always_invoice", "create_prorations", "none")),
            **_EXPAND,
        },
        catalog.update_item,
    ),
    (
        "POST",
        "/v1/subscription_items/{id}/usage_records",
        {
            "quantity": integer(required=True, minimum=0),
            "timestamp": timestamp(allow_now=True),
            "action": string(choices=("increment", "set")),
            **_EXPAND,
        },
        usage.create_usage_record,
    ),
    (
        "GET",
        "/v1/subscription_items/{id}/usage_record_summaries",
        _PAGE,
        usage.list_usage_summaries,
    ),
    (
        "POST",
        "/v1/billing/meters",
        {
            "display_name": string(required=True, max_length=250),
            "event_name": string(required=True, max_length=100),
            "default_aggregation": obj(
                {"formula": string(required=True, choices=("count", "last", "sum"))},
                required=True,
            ),
            "customer_mapping": obj(
                {
                    "event_payload_key": string(required=True, max_length=100),
                    "type": string(required=True, choices=("by_id",)),
                }
            ),
            "value_settings": obj({"event_payload_key": string(required=True, max_length=100)}),
            "event_time_window": string(choices=("day", "hour")),
            **_EXPAND,
        },
        meters.create_meter,
    ),
    (
        "GET",
        "/v1/billing/meters",
        {"status": string(choices=("active", "inactive")), **_PAGE},
        meters.list_meters,
    ),
    ("GET", "/v1/billing/meters/{id}", _EXPAND, meters.retrieve_meter),
    ("POST", "/v1/billing/meters/{id}/deactivate", _EXPAND, meters.deactivate_meter),
    ("POST", "/v1/billing/meters/{id}/reactivate", _EXPAND, meters.reactivate_meter),
    (
        "GET",
        "/v1/billing/meters/{id}/event_summaries",
        {
            "customer": string(required=True),
            "start_time": timestamp(required=True),
            "end_time": timestamp(required=True),
            "value_grouping_window": string(choices=("day", "hour")),
            **_PAGE,
        },
        meters.list_event_summaries,
    ),
    (
        "POST",
        "/v1/billing/meter_events",
        {
            "event_name": string(required=True, max_length=100),
            "payload": string_map(required=True),
            "identifier": string(max_length=100),
            "timestamp": timestamp(),
            **_EXPAND,
        },
        meters.create_meter_event,
    ),
    (
        "POST",
        "/v1/billing/meter_event_adjustments",
        {
            "event_name": string(required=True, max_length=100),
            "type": string(required=True, choices=("cancel",)),
            "cancel": obj({"identifier": string(max_length=100)}),
            **_EXPAND,
        },
        meters.create_adjustment,
    ),
    *schedules.SCHEDULE_ENDPOINTS,
    *invoices.INVOICE_ENDPOINTS,
    *test_clocks.TEST_CLOCK_ENDPOINTS,
)

_V2_TABLE: tuple[tuple[str, str, Mapping[str, Param], Handler, Auth], ...] = (
    ("POST", "/v2/billing/meter_event_session", {}, streams.create_meter_session, "secret_key"),
    (
        "POST",
        "/v2/billing/meter_event_stream",
        {
            "events": lst(
                obj(
                    {
                        # No length limits here: the v2 spec states none (v1's say 100).
                        "event_name": string(required=True),
                        "payload": string_map(required=True),
                        "identifier": string(),
                        "timestamp": date_time(),
                    }
                ),
                required=True,
                min_items=1,
                max_items=100,
            )
        },
        streams.stream_meter_events,
        "meter_session",
    ),
    ("GET", "/v2/core/events/{id}", {}, notifications.retrieve_event, "secret_key"),
)

ENDPOINTS: Mapping[tuple[str, str], Endpoint] = {
    **{
        (method, path): Endpoint(method, path, params, handler)
        for method, path, params, handler in _TABLE
    },
    **{
        (method, path): Endpoint(method, path, params, handler, auth)
        for method, path, params, handler, auth in _V2_TABLE
    },
}
"""Every implemented endpoint by ``(method, path template)``."""

_ROUTES = [
    (re.compile("^" + re.escape(e.path).replace(re.escape("{id}"), "(?P<id>[^/]+)") + "$"), e)
    for e in ENDPOINTS.values()
]


def match_endpoint(method: str, path: str) -> tuple[Endpoint, dict[str, str]] | None:
    """The endpoint serving ``method path`` and its path arguments, or None."""
    for pattern, endpoint in _ROUTES:
        if endpoint.method != method:
            continue
        found = pattern.match(path)
        if found is not None:
            return endpoint, found.groupdict()
    return None
