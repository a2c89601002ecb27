"""Customers, products, prices, subscriptions and items through the official SDK."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
import stripe

from stripe_standin import SpecChecker, StripeStandin
from tests.standin.standin_support import (
    BASIL,
    MONTH_LATER,
    SDK_WARNING,
    START,
    Scenario,
    legacy_price_params,
)

pytestmark = [pytest.mark.anyio, SDK_WARNING]


class TestScenario:
    """A whole migration set-up created through stripe-python, as a real team would."""

    async def test_scenario_objects_are_linked(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """The subscription holds one metered item on the legacy price, in the current period."""
        sub = await client.v1.subscriptions.retrieve_async(scenario.subscription)
        assert sub["customer"] == scenario.customer
        assert sub["status"] == "active"
        (item,) = sub["items"]["data"]
        assert item["id"] == scenario.item
        assert item["price"]["id"] == scenario.legacy_price
        assert item["price"]["recurring"]["aggregate_usage"] == "sum"
        assert "quantity" not in item.to_dict()
        assert (item["current_period_start"], item["current_period_end"]) == (START, MONTH_LATER)
        assert (sub["current_period_start"], sub["current_period_end"]) == (START, MONTH_LATER)

    async def test_meter_price_is_backed_by_the_meter(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """The meter-backed price names its meter and has no aggregate_usage."""
        price = await client.v1.prices.retrieve_async(scenario.meter_price)
        assert price["recurring"]["meter"] == scenario.meter
        assert price["recurring"]["aggregate_usage"] is None
        assert price["unit_amount_decimal"] == Decimal("2")

    async def test_retrieve_and_list(self, client: stripe.StripeClient, scenario: Scenario) -> None:
        """Objects can be read back one by one and listed with Stripe's list envelope."""
        customer = await client.v1.customers.retrieve_async(scenario.customer)
        assert customer["email"] == "ada@example.com"
        product = await client.v1.products.retrieve_async(scenario.product)
        assert product["name"] == "API calls"
        prices = await client.v1.prices.list_async({"product": scenario.product})
        assert {p.id for p in prices.data} == {scenario.legacy_price, scenario.meter_price}
        items = await client.v1.subscription_items.list_async(
            {"subscription": scenario.subscription}
        )
        assert [i.id for i in items.data] == [scenario.item]
        subs = await client.v1.subscriptions.list_async({"customer": scenario.customer})
        assert [s.id for s in subs.data] == [scenario.subscription]

    async def test_cutover_moves_the_item_to_the_meter_price(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Updating the item's price keeps its id and puts it on the meter-backed price."""
        item = await client.v1.subscription_items.update_async(
            scenario.item, {"price": scenario.meter_price, "proration_behavior": "none"}
        )
        assert item.id == scenario.item
        assert item["price"]["recurring"]["meter"] == scenario.meter

    async def test_metadata_update_on_basil(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """A legacy item's metadata can still be changed on basil; only attaching is refused."""
        item = await client.v1.subscription_items.update_async(
            scenario.item, {"metadata": {"team": "billing"}}, {"stripe_version": BASIL}
        )
        assert item["metadata"].to_dict() == {"team": "billing"}
        with pytest.raises(stripe.InvalidRequestError):
            await client.v1.subscription_items.update_async(
                scenario.item, {"quantity": 2}, {"stripe_version": BASIL}
            )


class TestLists:
    """Stripe's list paging: newest first, limit, starting_after and ending_before."""

    async def test_paging(self, client: stripe.StripeClient) -> None:
        """Pages follow one another and say whether more remain."""
        ids = [(await client.v1.customers.create_async({"name": f"c{i}"})).id for i in range(5)]
        newest_first = ids[::-1]
        first = await client.v1.customers.list_async({"limit": 2})
        assert [c.id for c in first.data] == newest_first[:2]
        assert first.has_more is True
        second = await client.v1.customers.list_async({"limit": 2, "starting_after": ids[3]})
        assert [c.id for c in second.data] == newest_first[2:4]
        back = await client.v1.customers.list_async({"limit": 2, "ending_before": ids[1]})
        assert [c.id for c in back.data] == newest_first[1:3]
        assert back.has_more is True

    async def test_lookup_keys_filter(self, client: stripe.StripeClient) -> None:
        """``lookup_keys[]`` selects prices by lookup key."""
        product = await client.v1.products.create_async({"name": "p"})
        for key in ("a", "b"):
            await client.v1.prices.create_async(
                {"currency": "usd", "product": product.id, "unit_amount": 1, "lookup_key": key}
            )
        found = await client.v1.prices.list_async({"lookup_keys": ["b"]})
        assert [p["lookup_key"] for p in found.data] == ["b"]

    async def test_unknown_cursor(self, client: stripe.StripeClient) -> None:
        """A cursor naming no object is a 404 naming the cursor parameter."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.customers.list_async({"starting_after": "cus_missing"})
        assert caught.value.http_status == 404
        assert caught.value.param == "starting_after"


class TestParameterErrors:
    """Stripe's error codes for bad parameters."""

    async def test_unknown_parameter(
        self, http: httpx.AsyncClient, stripe_spec: SpecChecker
    ) -> None:
        """An unknown parameter is refused with ``parameter_unknown`` and its name."""
        with stripe_spec.expect_invalid_requests():
            reply = await http.post("/v1/customers", data={"nmae": "x"})
        assert reply.status_code == 400
        assert reply.json() == {
            "error": {
                "type": "invalid_request_error",
                "code": "parameter_unknown",
                "doc_url": "https://stripe.com/docs/error-codes/parameter-unknown",
                "param": "nmae",
                "message": "Received unknown parameter: nmae",
            }
        }

    async def test_unknown_nested_parameter(
        self, http: httpx.AsyncClient, stripe_spec: SpecChecker
    ) -> None:
        """Nested unknown parameters are named with Stripe's brackets."""
        with stripe_spec.expect_invalid_requests():
            reply = await http.post(
                "/v1/prices",
                data={"currency": "usd", "unit_amount": "1", "recurring[color]": "blue"},
            )
        assert reply.json()["error"]["param"] == "recurring[color]"

    async def test_missing_parameter(
        self, client: stripe.StripeClient, stripe_spec: SpecChecker
    ) -> None:
        """A missing required parameter is ``parameter_missing`` (a request sent bad on purpose)."""
        with (
            stripe_spec.expect_invalid_requests(),
            pytest.raises(stripe.InvalidRequestError) as caught,
        ):
            await client.v1.billing.meters.create_async(
                {"display_name": "x", "default_aggregation": {"formula": "sum"}}  # type: ignore[typeddict-item]
            )
        assert caught.value.code == "parameter_missing"
        assert caught.value.param == "event_name"

    @pytest.mark.parametrize(
        ("data", "code", "param", "breaks_spec"),
        [
            (
                {"currency": "usd", "unit_amount": "abc"},
                "parameter_invalid_integer",
                "unit_amount",
                True,
            ),
            # The spec's schema has no minimum and no minLength: only Stripe's server refuses these.
            (
                {"currency": "usd", "unit_amount": "-1"},
                "parameter_invalid_integer",
                "unit_amount",
                False,
            ),
            ({"currency": "", "unit_amount": "1"}, "parameter_invalid_empty", "currency", False),
            (
                {"currency": "usd", "unit_amount": "1", "recurring[interval]": "fortnight"},
                None,
                "recurring[interval]",
                True,
            ),
        ],
    )
    async def test_invalid_values(
        self,
        http: httpx.AsyncClient,
        stripe_spec: SpecChecker,
        data: dict[str, str],
        code: str | None,
        param: str,
        breaks_spec: bool,
    ) -> None:
        """Bad integers, empty strings and bad enum values carry Stripe's codes and the param."""
        if breaks_spec:
            with stripe_spec.expect_invalid_requests():
                error = (await http.post("/v1/prices", data=data)).json()["error"]
        else:
            error = (await http.post("/v1/prices", data=data)).json()["error"]
        assert error.get("code") == code
        assert error["param"] == param

    async def test_resource_missing(self, client: stripe.StripeClient) -> None:
        """An unknown id is a 404 ``resource_missing`` in Stripe's words."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.subscription_items.retrieve_async("si_missing")
        assert caught.value.http_status == 404
        assert caught.value.code == "resource_missing"
        assert caught.value.user_message == "No such subscription item: 'si_missing'"


class TestPriceRules:
    """Which prices each API version allows."""

    async def test_aggregate_usage_unknown_on_basil(
        self, client: stripe.StripeClient, scenario: Scenario, stripe_spec: SpecChecker
    ) -> None:
        """On basil, ``recurring[aggregate_usage]`` is an unknown parameter (Stripe's basil+
        spec agrees: the request breaks it)."""
        with (
            stripe_spec.expect_invalid_requests(),
            pytest.raises(stripe.InvalidRequestError) as caught,
        ):
            await client.v1.prices.create_async(
                legacy_price_params(scenario.product, "sum"),
                {"stripe_version": BASIL},
            )
        assert caught.value.code == "parameter_unknown"

    async def test_legacy_metered_price_refused_on_basil(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """On basil a metered price needs a meter."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.prices.create_async(
                {
                    "currency": "usd",
                    "product": scenario.product,
                    "unit_amount": 1,
                    "recurring": {"interval": "month", "usage_type": "metered"},
                },
                {"stripe_version": BASIL},
            )
        assert caught.value.param == "recurring[meter]"

    async def test_basil_price_has_no_aggregate_usage(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Read on basil, a price's ``recurring`` no longer carries ``aggregate_usage``."""
        price = await client.v1.prices.retrieve_async(
            scenario.meter_price, options={"stripe_version": BASIL}
        )
        assert "aggregate_usage" not in price["recurring"].to_dict()

    async def test_quantity_refused_for_metered_items(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Metered items take no quantity, as on Stripe."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.subscriptions.create_async(
                {
                    "customer": scenario.customer,
                    "items": [{"price": scenario.legacy_price, "quantity": 3}],
                }
            )
        assert caught.value.param == "items[0][quantity]"

    async def test_billing_cycle_anchor_sets_periods(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A subscription anchored on the 31st bills to the end of February."""
        jan_31 = 1_738_281_600  # 2025-01-31T00:00:00Z
        standin.clock.set(jan_31 + 3600)
        sub = await client.v1.subscriptions.create_async(
            {
                "customer": scenario.customer,
                "items": [{"price": scenario.legacy_price}],
                "billing_cycle_anchor": jan_31,
            }
        )
        assert sub["current_period_end"] == 1_740_700_800  # 2025-02-28T00:00:00Z
