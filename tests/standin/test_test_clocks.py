"""Stripe's test clocks in the stand-in, through stripe-python: the clock itself, and customers,
subscriptions, usage records, schedules and meter events living on its frozen time.

The clocks here start on 2024-01-31 (a month-end anchor, in a leap year) while the stand-in's own
clock is at 2025-01-15 (``START``): every date below can only come from the test clock.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import stripe

from stripe_standin import StripeStandin
from tests.standin.standin_support import SDK_WARNING, Scenario, usage_record, usage_summaries

pytestmark = [pytest.mark.anyio, SDK_WARNING]

JAN_31 = 1_706_659_200  # 2024-01-31T00:00:00Z
FEB_29 = 1_709_164_800  # 2024-02-29T00:00:00Z
MAR_31 = 1_711_843_200  # 2024-03-31T00:00:00Z
DAY = 86_400


async def _clock(client: stripe.StripeClient, frozen_time: int = JAN_31) -> Any:
    return await client.v1.test_helpers.test_clocks.create_async(
        {"frozen_time": frozen_time, "name": "rehearsal"}
    )


async def _advance(client: stripe.StripeClient, clock: str, to: int) -> Any:
    """Advance and wait until the clock is ready again (polling, as a client must)."""
    started = await client.v1.test_helpers.test_clocks.advance_async(clock, {"frozen_time": to})
    assert started["status"] == "advancing"
    return await _ready(client, clock)


async def _ready(client: stripe.StripeClient, clock: str) -> Any:
    """Poll the clock until it is ``ready`` (bounded: 200 polls)."""
    for _ in range(200):
        current = await client.v1.test_helpers.test_clocks.retrieve_async(clock)
        if current["status"] == "ready":
            return current
        await anyio.sleep(0.02)
    raise AssertionError(f"test clock {clock} never became ready")


async def _subscriber(
    client: stripe.StripeClient, scenario: Scenario, clock: str, price: str | None = None
) -> tuple[str, Any]:
    """A customer on the clock with a subscription to the legacy price: (customer, subscription)."""
    customer = await client.v1.customers.create_async({"name": "Clocked", "test_clock": clock})
    sub = await client.v1.subscriptions.create_async(
        {"customer": customer.id, "items": [{"price": price or scenario.legacy_price}]}
    )
    return customer.id, sub


class TestTheClock:
    """Create, retrieve, list, advance, delete."""

    async def test_create(self, client: stripe.StripeClient, standin: StripeStandin) -> None:
        """A new clock is ready at its frozen time; it auto-deletes a week after creation."""
        clock = await _clock(client)
        assert clock["object"] == "test_helpers.test_clock"
        assert (clock["status"], clock["frozen_time"], clock["name"]) == (
            "ready",
            JAN_31,
            "rehearsal",
        )
        assert clock["deletes_after"] - clock["created"] == 7 * DAY
        assert clock["status_details"].to_dict() == {}
        listed = await client.v1.test_helpers.test_clocks.list_async()
        assert [c.id for c in listed.data] == [clock.id]

    async def test_advance_goes_through_advancing_to_ready(
        self, client: stripe.StripeClient, standin: StripeStandin
    ) -> None:
        """The advance reply says ``advancing`` with the old time and the target; the clock is
        ``ready`` at the new time once done (here after a delay, so polling sees ``advancing``)."""
        standin.test_clock_advance_seconds = 0.3
        clock = await _clock(client)
        started = await client.v1.test_helpers.test_clocks.advance_async(
            clock.id, {"frozen_time": JAN_31 + DAY}
        )
        assert (started["status"], started["frozen_time"]) == ("advancing", JAN_31)
        assert started["status_details"]["advancing"]["target_frozen_time"] == JAN_31 + DAY
        seen = await client.v1.test_helpers.test_clocks.retrieve_async(clock.id)
        assert seen["status"] == "advancing"
        done = await _ready(client, clock.id)
        assert (done["status"], done["frozen_time"]) == ("ready", JAN_31 + DAY)

    @pytest.mark.parametrize(
        ("target", "mentions"),
        [
            (JAN_31, "after the test clock's current frozen time"),
            (JAN_31 - 1, "after the test clock's current frozen time"),
            (MAR_31 + 1, "two intervals"),
        ],
    )
    async def test_advance_refusals(
        self, client: stripe.StripeClient, scenario: Scenario, target: int, mentions: str
    ) -> None:
        """Not forward, or past two intervals of the shortest subscription: a 400 on frozen_time."""
        clock = await _clock(client)
        await _subscriber(client, scenario, clock.id)
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.test_helpers.test_clocks.advance_async(
                clock.id, {"frozen_time": target}
            )
        assert caught.value.param == "frozen_time"
        assert mentions in str(caught.value.user_message)

    async def test_no_second_advance_while_advancing(
        self, client: stripe.StripeClient, standin: StripeStandin
    ) -> None:
        """An advancing clock refuses another advance until it is ready."""
        standin.test_clock_advance_seconds = 60
        clock = await _clock(client)
        await client.v1.test_helpers.test_clocks.advance_async(
            clock.id, {"frozen_time": JAN_31 + 1}
        )
        with pytest.raises(stripe.InvalidRequestError, match="advancing"):
            await client.v1.test_helpers.test_clocks.advance_async(
                clock.id, {"frozen_time": JAN_31 + 2}
            )

    async def test_delete_takes_its_customers(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Deleting a clock deletes the customers (and subscriptions) living on it."""
        clock = await _clock(client)
        customer, sub = await _subscriber(client, scenario, clock.id)
        deleted = await client.v1.test_helpers.test_clocks.delete_async(clock.id)
        assert (deleted.id, deleted["deleted"]) == (clock.id, True)
        with pytest.raises(stripe.InvalidRequestError):
            await client.v1.customers.retrieve_async(customer)
        with pytest.raises(stripe.InvalidRequestError):
            await client.v1.subscriptions.retrieve_async(sub.id)
        with pytest.raises(stripe.InvalidRequestError):
            await client.v1.test_helpers.test_clocks.retrieve_async(clock.id)


class TestObjectsOnTheClock:
    """Customers and subscriptions carry ``test_clock`` and live on its frozen time."""

    async def test_customer_and_subscription_carry_the_clock(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Created at the frozen time, anchored there, the first period Jan 31 to Feb 29."""
        clock = await _clock(client)
        customer, sub = await _subscriber(client, scenario, clock.id)
        got = await client.v1.customers.retrieve_async(customer)
        assert (got["test_clock"], got["created"]) == (clock.id, JAN_31)
        assert (sub["test_clock"], sub["created"], sub["billing_cycle_anchor"]) == (
            clock.id,
            JAN_31,
            JAN_31,
        )
        assert (sub["current_period_start"], sub["current_period_end"]) == (JAN_31, FEB_29)
        listed = await client.v1.subscriptions.list_async({"test_clock": clock.id})
        assert [s.id for s in listed.data] == [sub.id]

    async def test_advancing_rolls_the_periods_over(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Past Feb 29 the period is Feb 29 to Mar 31 (anchored on the 31st, leap year)."""
        clock = await _clock(client)
        _, sub = await _subscriber(client, scenario, clock.id)
        await _advance(client, clock.id, FEB_29 + DAY)
        item = await client.v1.subscription_items.retrieve_async(sub["items"]["data"][0]["id"])
        assert (item["current_period_start"], item["current_period_end"]) == (FEB_29, MAR_31)

    async def test_usage_records_follow_the_clock(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """ "now" is the frozen time; later than it is the future, before its period is refused;
        the summaries and totals are cut on the clock's periods."""
        clock = await _clock(client)
        _, sub = await _subscriber(client, scenario, clock.id)
        item = sub["items"]["data"][0]["id"]
        await _advance(client, clock.id, JAN_31 + 10 * DAY)
        record = await usage_record(client, item, 3)
        assert record["timestamp"] == JAN_31 + 10 * DAY
        with pytest.raises(stripe.InvalidRequestError, match="future"):
            await usage_record(client, item, 1, timestamp=JAN_31 + 10 * DAY + 1)
        with pytest.raises(stripe.InvalidRequestError, match="current period"):
            await usage_record(client, item, 1, timestamp=JAN_31 - DAY)
        await _advance(client, clock.id, FEB_29 + DAY)
        await usage_record(client, item, 5, timestamp=FEB_29 + 60)
        assert standin.legacy_total(item) == 5
        assert standin.legacy_total(item, period_start=JAN_31) == 3
        data = await usage_summaries(client, item)
        periods = [(s["period"]["start"], s["period"]["end"], s["total_usage"]) for s in data]
        assert periods == [(FEB_29, MAR_31, 5), (JAN_31, FEB_29, 3)]

    async def test_schedule_phases_follow_the_clock(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """A schedule moving the item to the meter price at the period end does so when the
        clock passes it, not when the stand-in's own clock would."""
        clock = await _clock(client)
        _, sub = await _subscriber(client, scenario, clock.id)
        schedule = await client.v1.subscription_schedules.create_async(
            {"from_subscription": sub.id}
        )
        assert schedule["test_clock"] == clock.id
        await client.v1.subscription_schedules.update_async(
            schedule.id,
            {
                "phases": [
                    {"items": [{"price": scenario.legacy_price}], "end_date": FEB_29},
                    {"items": [{"price": scenario.meter_price}], "end_date": MAR_31},
                ],
            },
        )
        item = sub["items"]["data"][0]["id"]
        before = await client.v1.subscription_items.retrieve_async(item)
        assert before["price"]["id"] == scenario.legacy_price
        await _advance(client, clock.id, FEB_29 + 60)
        after = await client.v1.subscription_items.retrieve_async(item)
        assert after["price"]["id"] == scenario.meter_price

    async def test_meter_events_are_judged_on_the_clock(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A clock customer's event a year before the stand-in's time is inside its window; its
        default timestamp is the frozen time (UNVERIFIED for Stripe, see ``_test_clocks``)."""
        clock = await _clock(client)
        customer, _ = await _subscriber(client, scenario, clock.id)
        payload = {"stripe_customer_id": customer, "value": "4"}
        event = await client.v1.billing.meter_events.create_async(
            {"event_name": scenario.event_name, "payload": payload, "timestamp": JAN_31 - 60}
        )
        assert event["timestamp"] == JAN_31 - 60
        defaulted = await client.v1.billing.meter_events.create_async(
            {"event_name": scenario.event_name, "payload": payload}
        )
        assert defaulted["timestamp"] == JAN_31
        assert standin.meter_total(customer, scenario.event_name) == 8.0

    async def test_a_customer_off_the_clock_is_unaffected(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Without a clock, the stand-in's own time rules (the same event is 35 days too old)."""
        await _clock(client)
        payload = {"stripe_customer_id": scenario.customer, "value": "4"}
        with pytest.raises(stripe.InvalidRequestError, match="35 days"):
            await client.v1.billing.meter_events.create_async(
                {"event_name": scenario.event_name, "payload": payload, "timestamp": JAN_31 - 60}
            )

    async def test_unknown_clock_is_refused(self, client: stripe.StripeClient) -> None:
        """A customer naming a clock that does not exist is a 404 on ``test_clock``."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.customers.create_async({"name": "x", "test_clock": "clock_nope"})
        assert (caught.value.http_status, caught.value.param) == (404, "test_clock")
