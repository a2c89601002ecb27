"""Billing meters and meter events through stripe-python: counting, windows, dedupe, summaries."""

from __future__ import annotations

import pytest
import stripe

from stripe_standin import StripeStandin
from tests.standin.standin_support import SDK_WARNING, START, Scenario

pytestmark = [pytest.mark.anyio, SDK_WARNING]

DAY = 86_400


async def _event(
    client: stripe.StripeClient,
    scenario: Scenario,
    value: str,
    *,
    identifier: str | None = None,
    timestamp: int | None = None,
    customer: str | None = None,
    event_name: str | None = None,
) -> stripe.StripeObject:
    params: dict[str, object] = {
        "event_name": event_name or scenario.event_name,
        "payload": {"stripe_customer_id": customer or scenario.customer, "value": value},
    }
    if identifier is not None:
        params["identifier"] = identifier
    if timestamp is not None:
        params["timestamp"] = timestamp
    return await client.v1.billing.meter_events.create_async(params)  # type: ignore[arg-type]


class TestMeters:
    """Meters themselves."""

    async def test_meter_shape(self, client: stripe.StripeClient, scenario: Scenario) -> None:
        """A meter reads back with Stripe's fields."""
        meter = await client.v1.billing.meters.retrieve_async(scenario.meter)
        assert meter["event_name"] == scenario.event_name
        assert meter["default_aggregation"]["formula"] == "sum"
        assert meter["customer_mapping"].to_dict() == {
            "event_payload_key": "stripe_customer_id",
            "type": "by_id",
        }
        assert meter["status"] == "active"
        listed = await client.v1.billing.meters.list_async({"status": "active"})
        assert [m.id for m in listed.data] == [scenario.meter]

    async def test_one_active_meter_per_event_name(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """A second active meter for the same event name is refused until the first is deactivated."""
        params = {
            "display_name": "again",
            "event_name": scenario.event_name,
            "default_aggregation": {"formula": "count"},
        }
        with pytest.raises(stripe.InvalidRequestError):
            await client.v1.billing.meters.create_async(params)  # type: ignore[arg-type]
        deactivated = await client.v1.billing.meters.deactivate_async(scenario.meter)
        assert deactivated["status"] == "inactive"
        assert deactivated["status_transitions"]["deactivated_at"] is not None
        await client.v1.billing.meters.create_async(params)  # type: ignore[arg-type]
        with pytest.raises(stripe.InvalidRequestError):
            await client.v1.billing.meters.reactivate_async(scenario.meter)


class TestEvents:
    """Meter events: accepted, counted (or not), deduplicated, cancelled."""

    async def test_events_are_counted(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """Accepted events add up by the meter's formula and echo Stripe's object."""
        event = await _event(client, scenario, "5", identifier="ev-1")
        assert event.to_dict() == {
            "object": "billing.meter_event",
            "created": event["created"],
            "event_name": scenario.event_name,
            "identifier": "ev-1",
            "livemode": False,
            "payload": {"stripe_customer_id": scenario.customer, "value": "5"},
            "timestamp": event["created"],
        }
        await _event(client, scenario, "7")
        assert standin.meter_total(scenario.customer, scenario.event_name) == 12.0
        events = standin.meter_events(customer=scenario.customer)
        assert [e["value"] for e in events] == [5.0, 7.0]
        assert events[1]["identifier"]  # generated when absent

    async def test_duplicate_identifier(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A reused identifier is refused for 24 hours, as Stripe does, then accepted again."""
        await _event(client, scenario, "5", identifier="dup")
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await _event(client, scenario, "5", identifier="dup")
        assert caught.value.user_message == "An event already exists with identifier dup."
        assert caught.value.headers is not None
        assert caught.value.headers["Stripe-Should-Retry"] == "false"
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0
        standin.clock.advance(DAY + 1)
        await _event(client, scenario, "5", identifier="dup")
        assert standin.meter_total(scenario.customer, scenario.event_name) == 10.0

    @pytest.mark.parametrize("offset", [-35 * DAY - 1, 301])
    async def test_timestamp_window_refused(
        self, client: stripe.StripeClient, scenario: Scenario, offset: int
    ) -> None:
        """Timestamps over 35 days old or over 5 minutes ahead are refused synchronously."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await _event(client, scenario, "1", timestamp=START + offset)
        assert caught.value.param == "timestamp"

    @pytest.mark.parametrize("offset", [-35 * DAY + 5, 290])
    async def test_timestamp_window_edges_accepted(
        self, client: stripe.StripeClient, scenario: Scenario, offset: int
    ) -> None:
        """Just inside either edge of the window is fine."""
        event = await _event(client, scenario, "1", timestamp=START + offset)
        assert event["timestamp"] == START + offset

    @pytest.mark.parametrize("value", ["1.5", "abc", "1234567890123456"])
    async def test_bad_values_refused(
        self, client: stripe.StripeClient, scenario: Scenario, value: str
    ) -> None:
        """Values must be whole numbers of at most 15 digits."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await _event(client, scenario, value)
        assert caught.value.param == "payload[value]"

    async def test_too_many_digits_message(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Over 15 digits gets the message from Stripe's dahlia changelog."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await _event(client, scenario, "1234567890123456")
        assert caught.value.user_message == (
            "The value in the event payload can have at most 15 digits. Received 1234567890123456."
        )

    @pytest.mark.parametrize(
        ("value", "total"), [("123456789012345", 123456789012345.0), ("-3", -3.0), ("2.0", 2.0)]
    )
    async def test_whole_values_accepted(
        self,
        client: stripe.StripeClient,
        scenario: Scenario,
        standin: StripeStandin,
        value: str,
        total: float,
    ) -> None:
        """Fifteen digits, negative and ``2.0`` are whole numbers: accepted as sent, and counted."""
        event = await _event(client, scenario, value, identifier="whole")
        assert event["payload"]["value"] == value
        assert standin.meter_total(scenario.customer, scenario.event_name) == total
        assert standin.async_errors == []

    async def test_async_failures_are_accepted_but_not_counted(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """No meter, no customer key, unknown customer: 200 now, an async error for later."""
        await _event(client, scenario, "1", identifier="a", event_name="nobody_listens")
        await _event(client, scenario, "1", identifier="b", customer="cus_unknown")
        await client.v1.billing.meter_events.create_async(
            {"event_name": scenario.event_name, "payload": {"value": "1"}, "identifier": "c"}
        )
        assert standin.meter_total(scenario.customer, scenario.event_name) == 0.0
        codes = {(e["identifier"], e["code"]) for e in standin.async_errors}
        assert codes == {
            ("a", "no_meter"),
            ("b", "meter_event_customer_not_found"),
            ("c", "meter_event_no_customer_defined"),
        }

    async def test_cancel_adjustment(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A cancel adjustment within 24 hours removes the event from the totals."""
        await _event(client, scenario, "5", identifier="keep")
        await _event(client, scenario, "9", identifier="drop")
        adjustment = await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": scenario.event_name, "type": "cancel", "cancel": {"identifier": "drop"}}
        )
        assert adjustment["object"] == "billing.meter_event_adjustment"
        assert adjustment["cancel"]["identifier"] == "drop"
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0

    async def test_cancel_too_late(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """After 24 hours an event can no longer be cancelled."""
        await _event(client, scenario, "5", identifier="old")
        standin.clock.advance(DAY + 1)
        with pytest.raises(stripe.InvalidRequestError):
            await client.v1.billing.meter_event_adjustments.create_async(
                {
                    "event_name": scenario.event_name,
                    "type": "cancel",
                    "cancel": {"identifier": "old"},
                }
            )
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0

    async def test_formulas_and_windows(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """``count`` counts events, ``last`` keeps the latest, an hour window keeps the newest."""
        for name, formula, window in (
            ("n", "count", None),
            ("l", "last", None),
            ("w", "sum", "hour"),
        ):
            params: dict[str, object] = {
                "display_name": name,
                "event_name": name,
                "default_aggregation": {"formula": formula},
            }
            if window is not None:
                params["event_time_window"] = window
            await client.v1.billing.meters.create_async(params)  # type: ignore[arg-type]
            for offset, value in ((-100, "4"), (-50, "6")):
                await _event(client, scenario, value, event_name=name, timestamp=START + offset)
        assert standin.meter_total(scenario.customer, "n") == 2.0
        assert standin.meter_total(scenario.customer, "l") == 6.0
        assert standin.meter_total(scenario.customer, "w") == 6.0


class TestSummaries:
    """``GET /v1/billing/meters/{id}/event_summaries``."""

    async def test_summary_over_a_range(
        self, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """One summary covers ``[start_time, end_time)``."""
        await _event(client, scenario, "3", timestamp=START - 3600)
        await _event(client, scenario, "4", timestamp=START - 60)
        summaries = await client.v1.billing.meters.event_summaries.list_async(
            scenario.meter,
            {"customer": scenario.customer, "start_time": START - 7200, "end_time": START},
        )
        (summary,) = summaries.data
        assert summary["aggregated_value"] == 7.0
        assert (summary["start_time"], summary["end_time"]) == (START - 7200, START)
        assert summary["meter"] == scenario.meter

    async def test_hourly_grouping(self, client: stripe.StripeClient, scenario: Scenario) -> None:
        """``value_grouping_window=hour`` gives one summary per hour."""
        await _event(client, scenario, "3", timestamp=START - 3600)
        await _event(client, scenario, "4", timestamp=START - 60)
        summaries = await client.v1.billing.meters.event_summaries.list_async(
            scenario.meter,
            {
                "customer": scenario.customer,
                "start_time": START - 7200,
                "end_time": START,
                "value_grouping_window": "hour",
            },
        )
        assert [s["aggregated_value"] for s in summaries.data] == [0.0, 7.0]

    @pytest.mark.parametrize(
        ("start", "end", "window", "param"),
        [
            (START - 7199, START, None, "start_time"),
            (START - 7200, START + 30, None, "end_time"),
            (START - 5400, START, "hour", "start_time"),
            (START - 7200, START, "day", "start_time"),
        ],
    )
    async def test_alignment_refused(
        self,
        client: stripe.StripeClient,
        scenario: Scenario,
        start: int,
        end: int,
        window: str | None,
        param: str,
    ) -> None:
        """Times off minute (or hour, or day) boundaries are refused, naming the parameter."""
        params: dict[str, object] = {
            "customer": scenario.customer,
            "start_time": start,
            "end_time": end,
        }
        if window is not None:
            params["value_grouping_window"] = window
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.billing.meters.event_summaries.list_async(
                scenario.meter,
                params,  # type: ignore[arg-type]
            )
        assert caught.value.param == param

    async def test_limit_bounds(self, client: stripe.StripeClient, scenario: Scenario) -> None:
        """``limit`` must be between 1 and 100."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v1.billing.meters.event_summaries.list_async(
                scenario.meter,
                {
                    "customer": scenario.customer,
                    "start_time": START - 60,
                    "end_time": START,
                    "limit": 101,
                },
            )
        assert caught.value.param == "limit"
