"""Legacy usage records and their per-period summaries, through stripe-python's ``raw_request``."""

from __future__ import annotations

import httpx
import pytest
import stripe

from stripe_standin import StandinError, StripeStandin, serve_standin
from tests.standin.standin_support import (
    ACACIA,
    BASIL,
    MONTH_LATER,
    SDK_WARNING,
    START,
    Scenario,
    legacy_price_params,
    usage_record,
    usage_summaries,
)

pytestmark = [pytest.mark.anyio, SDK_WARNING]


@pytest.fixture
def hour_in(scenario: Scenario, standin: StripeStandin) -> Scenario:
    """The scenario, an hour into its first period (so earlier timestamps are in the past)."""
    standin.clock.advance(3600)
    return scenario


async def _price(client: stripe.StripeClient, product: str, aggregate_usage: str) -> str:
    price = await client.v1.prices.create_async(legacy_price_params(product, aggregate_usage))
    return price.id


async def _item(client: stripe.StripeClient, scenario: Scenario, aggregate_usage: str) -> str:
    price = await _price(client, scenario.product, aggregate_usage)
    sub = await client.v1.subscriptions.create_async(
        {"customer": scenario.customer, "items": [{"price": price}], "billing_cycle_anchor": START}
    )
    return str(sub["items"]["data"][0]["id"])


class TestRecording:
    """``increment`` adds and ``set`` overwrites, per timestamp, within the current period."""

    async def test_increment_and_set(
        self, client: stripe.StripeClient, hour_in: Scenario, standin: StripeStandin
    ) -> None:
        """Increments add up; a set replaces the usage at its exact timestamp only."""
        t1, t2 = START + 10, START + 20
        record = await usage_record(client, hour_in.item, 5, timestamp=t1)
        assert record.to_dict() == {
            "id": record["id"],
            "object": "usage_record",
            "livemode": False,
            "quantity": 5,
            "subscription_item": hour_in.item,
            "timestamp": t1,
        }
        assert record["id"].startswith("mbur_")
        await usage_record(client, hour_in.item, 3, timestamp=t1)
        await usage_record(client, hour_in.item, 4, timestamp=t2)
        assert standin.legacy_total(hour_in.item) == 12
        await usage_record(client, hour_in.item, 1, timestamp=t1, action="set")
        assert standin.legacy_total(hour_in.item) == 5
        assert [r["quantity"] for r in standin.usage_records(hour_in.item)] == [5, 3, 4, 1]

    async def test_now_is_the_default_timestamp(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """``timestamp=now`` (the default) takes the stand-in's clock."""
        standin.clock.advance(3600)
        record = await usage_record(client, scenario.item, 2)
        assert abs(record["timestamp"] - (START + 3600)) <= 2

    async def test_no_timestamp_is_now(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A usage record sent without ``timestamp`` at all is stamped with the clock too."""
        standin.clock.advance(3600)
        response = await client.raw_request_async(
            "post",
            f"/v1/subscription_items/{scenario.item}/usage_records",
            quantity=2,
            stripe_version=ACACIA,
        )
        record = client.deserialize(response, api_mode="V1")
        assert abs(record["timestamp"] - (START + 3600)) <= 2

    async def test_usage_record_on_an_unknown_item(self, client: stripe.StripeClient) -> None:
        """Stripe's 404 naming the item and the parameter."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await usage_record(client, "si_nope", 1)
        assert (caught.value.http_status, caught.value.code) == (404, "resource_missing")
        assert caught.value.param == "subscription_item"
        assert "No such subscription item: 'si_nope'" in str(caught.value.user_message)

    async def test_summaries_per_period(
        self, client: stripe.StripeClient, hour_in: Scenario, standin: StripeStandin
    ) -> None:
        """After a period boundary the summaries list the open period first, then the closed one."""
        await usage_record(client, hour_in.item, 7, timestamp=START + 60)
        standin.clock.set(MONTH_LATER + 100)
        await usage_record(client, hour_in.item, 2, timestamp=MONTH_LATER + 50)
        current, closed = await usage_summaries(client, hour_in.item)
        assert current["invoice"] is None
        assert current["period"] == {
            "start": MONTH_LATER,
            "end": 1_742_040_000,
        }  # 2025-03-15T12:00:00Z
        assert current["total_usage"] == 2
        assert closed["period"] == {"start": START, "end": MONTH_LATER}
        assert closed["total_usage"] == 7
        assert str(closed["invoice"]).startswith("in_")
        assert str(closed["id"]).startswith("sis_")
        assert standin.legacy_total(hour_in.item, period_start=START) == 7
        assert standin.legacy_total(hour_in.item) == 2

    @pytest.mark.parametrize(
        ("aggregate_usage", "expected"),
        [("sum", 9), ("max", 5), ("last_during_period", 1), ("last_ever", 1)],
    )
    async def test_aggregate_usage(
        self,
        client: stripe.StripeClient,
        hour_in: Scenario,
        standin: StripeStandin,
        aggregate_usage: str,
        expected: int,
    ) -> None:
        """Each ``aggregate_usage`` mode totals the same records its own way."""
        item = await _item(client, hour_in, aggregate_usage)
        for offset, quantity in ((10, 3), (20, 5), (30, 1)):
            await usage_record(client, item, quantity, timestamp=START + offset)
        assert standin.legacy_total(item) == expected

    @pytest.mark.parametrize("aggregate_usage", ["sum", "max", "last_during_period", "last_ever"])
    async def test_a_record_at_a_period_s_start_is_in_that_period_only(
        self,
        client: stripe.StripeClient,
        hour_in: Scenario,
        standin: StripeStandin,
        aggregate_usage: str,
    ) -> None:
        """Periods are ``[start, end)``: usage at the second period's first second (7) counts
        there, never in the first period (4)."""
        item = await _item(client, hour_in, aggregate_usage)
        await usage_record(client, item, 4, timestamp=START + 5)
        standin.clock.set(MONTH_LATER + 100)
        await usage_record(client, item, 7, timestamp=MONTH_LATER)
        totals = [s["total_usage"] for s in await usage_summaries(client, item)]
        assert totals == [7, 4]

    @pytest.mark.parametrize("aggregate_usage", ["last_ever", "max"])
    async def test_a_period_before_any_usage_holds_nothing(
        self,
        client: stripe.StripeClient,
        hour_in: Scenario,
        standin: StripeStandin,
        aggregate_usage: str,
    ) -> None:
        """The first period, with no record at or before its end, totals 0 (``last_ever`` has
        nothing to carry over)."""
        item = await _item(client, hour_in, aggregate_usage)
        standin.clock.set(MONTH_LATER + 100)
        await usage_record(client, item, 3, timestamp=MONTH_LATER + 50)
        totals = [s["total_usage"] for s in await usage_summaries(client, item)]
        assert totals == [3, 0]

    async def test_last_ever_carries_over(
        self, client: stripe.StripeClient, hour_in: Scenario, standin: StripeStandin
    ) -> None:
        """``last_ever`` keeps billing the last value in a period with no records."""
        item = await _item(client, hour_in, "last_ever")
        await usage_record(client, item, 4, timestamp=START + 5)
        standin.clock.set(MONTH_LATER + 10)
        assert standin.legacy_total(item) == 4

    async def test_unknown_item_for_helpers(self, standin: StripeStandin) -> None:
        """The assertion helpers name a missing item instead of returning 0."""
        with pytest.raises(StandinError, match="si_nope"):
            standin.legacy_total("si_nope")


class TestRefusals:
    """What Stripe refuses on the legacy path."""

    async def test_before_the_current_period(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A timestamp before the current period start is refused in Stripe's words."""
        standin.clock.set(MONTH_LATER + 100)
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await usage_record(client, scenario.item, 1, timestamp=MONTH_LATER - 1)
        assert caught.value.param == "timestamp"
        assert "must be after the subscription's last invoice period" in str(
            caught.value.user_message
        )
        assert standin.usage_records() == []

    async def test_summaries_of_an_unknown_item(self, client: stripe.StripeClient) -> None:
        """Stripe's 404 naming the item and the parameter, not an empty list."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await usage_summaries(client, "si_nope")
        assert (caught.value.http_status, caught.value.code) == (404, "resource_missing")
        assert caught.value.param == "subscription_item"
        assert "No such subscription item: 'si_nope'" in str(caught.value.user_message)

    async def test_in_the_future(self, client: stripe.StripeClient, scenario: Scenario) -> None:
        """A future timestamp is refused."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await usage_record(client, scenario.item, 1, timestamp=START + 3600)
        assert caught.value.param == "timestamp"

    async def test_refused_on_basil(self, client: stripe.StripeClient, scenario: Scenario) -> None:
        """On basil or later the endpoint is gone; the message says to pin a pre-basil version."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await usage_record(client, scenario.item, 1, version=BASIL)
        assert "2025-03-31.basil" in str(caught.value.user_message)

    async def test_default_version_applies(
        self, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """Without a Stripe-Version header the account default decides (basil here: refused)."""
        standin.default_api_version = BASIL
        with serve_standin(standin) as running:
            async with httpx.AsyncClient(base_url=running.url) as raw:
                reply = await raw.post(
                    f"/v1/subscription_items/{scenario.item}/usage_records",
                    data={"quantity": "1"},
                    headers={"Authorization": "Bearer sk_test_0123456789abcdef"},
                )
        assert reply.status_code == 400
        assert reply.headers["Stripe-Version"] == BASIL

    async def test_refused_on_a_meter_item(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Once the item is on the meter price, Stripe points at meter events."""
        await client.v1.subscription_items.update_async(
            scenario.item, {"price": scenario.meter_price}
        )
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await usage_record(client, scenario.item, 1)
        assert caught.value.user_message == (
            f"Cannot create a usage record for `{scenario.item}` because it is not on the legacy "
            "metered billing system. Call /v1/billing/meter_events instead."
        )

    async def test_summaries_survive_the_cutover(
        self, client: stripe.StripeClient, hour_in: Scenario, standin: StripeStandin
    ) -> None:
        """Usage recorded before the cutover still reads back by the old price's aggregation."""
        await usage_record(client, hour_in.item, 6, timestamp=START + 1)
        await client.v1.subscription_items.update_async(
            hour_in.item, {"price": hour_in.meter_price}
        )
        assert standin.legacy_total(hour_in.item) == 6
        (summary,) = await usage_summaries(client, hour_in.item)
        assert summary["total_usage"] == 6

    async def test_summaries_keep_the_old_price_s_aggregation(
        self, client: stripe.StripeClient, hour_in: Scenario, standin: StripeStandin
    ) -> None:
        """A ``max`` item moved to the meter-backed price still summarises its records by
        ``max`` (5), not by the meter price's (no ``aggregate_usage``: a sum would say 9)."""
        item = await _item(client, hour_in, "max")
        for offset, quantity in ((10, 3), (20, 5), (30, 1)):
            await usage_record(client, item, quantity, timestamp=START + offset)
        await client.v1.subscription_items.update_async(item, {"price": hour_in.meter_price})
        (summary,) = await usage_summaries(client, item)
        assert summary["total_usage"] == 5
        assert standin.legacy_total(item) == 5

    async def test_negative_quantity(self, client: stripe.StripeClient, scenario: Scenario) -> None:
        """Quantities are whole numbers ≥ 0."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await usage_record(client, scenario.item, -1)
        assert caught.value.code == "parameter_invalid_integer"
