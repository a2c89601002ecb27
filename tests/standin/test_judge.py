"""The judge's arithmetic against tables worked out by hand: every ``aggregate_usage`` mode of the
legacy usage record summaries, and every meter formula, read back the way dualwrite reads them
(``usage_record_summaries``, ``event_summaries``) as well as through the totals helpers.

Rules (each table names its page):

* usage records (docs.stripe.com/api/usage_records/create): records sharing a timestamp add up
  (``increment``); ``set`` overwrites the usage at its timestamp. ``aggregate_usage``
  (docs.stripe.com/api/prices/object, recurring.aggregate_usage): ``sum`` adds the period's usage,
  ``max`` takes the largest, ``last_during_period`` the last in the period, ``last_ever`` the last
  ever (so it carries into a period with no records). Periods hold their start, not their end.
* meters (docs.stripe.com/api/billing/meter/object, default_aggregation.formula): ``sum`` adds the
  values, ``count`` counts events, ``last`` takes the last one; cancelled events
  (docs.stripe.com/api/billing/meter-event-adjustment) and events refused later do not count; with
  ``event_time_window=hour`` only the newest event of each hour counts
  (docs.stripe.com/billing/subscriptions/usage-based/recording-usage).

The tables keep timestamps in the order the records are sent, where "last" could mean either.
"""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from stripe_standin import StripeStandin
from tests.standin.standin_support import (
    MONTH_LATER,
    SDK_WARNING,
    START,
    Scenario,
    legacy_price_params,
    usage_record,
    usage_summaries,
)

pytestmark = [pytest.mark.anyio, SDK_WARNING]

HOUR, DAY = 3600, 86_400
MARCH_15 = 1_742_040_000
"""2025-03-15T12:00:00Z: the third period's start (the anchor is 2025-01-15T12:00:00Z)."""

# (timestamp, quantity, action), sent in this order, each while its period is the current one.
FIRST_PERIOD = [
    (START + 1 * DAY, 5, "increment"),
    (START + 2 * DAY, 3, "increment"),
    (START + 2 * DAY, 4, "increment"),  # same timestamp: 7 there
    (START + 5 * DAY, 2, "set"),
    (START + 5 * DAY, 6, "set"),  # set overwrites: 6 there
    (START + 7 * DAY, 1, "increment"),
]
SECOND_PERIOD = [
    (MONTH_LATER, 2, "increment"),  # the period's first second belongs to it
    (MONTH_LATER + 1 * DAY, 9, "increment"),
    (MONTH_LATER + 3 * DAY, 4, "set"),
]

# total_usage per period (first, second, third with no records), worked out by hand:
#   first:  per timestamp 5, 7, 6, 1  -> sum 19, max 7, last 1
#   second: per timestamp 2, 9, 4     -> sum 15, max 9, last 4
#   third:  nothing                   -> 0, except last_ever, which carries 4
AGGREGATES = {
    "sum": (19, 15, 0),
    "max": (7, 9, 0),
    "last_during_period": (1, 4, 0),
    "last_ever": (1, 4, 4),
}


class TestUsageRecordSummaries:
    """Every ``aggregate_usage`` mode over three periods."""

    @pytest.mark.parametrize("mode", sorted(AGGREGATES))
    async def test_hand_worked_totals(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin, mode: str
    ) -> None:
        """Each period's ``total_usage`` is the hand-worked one, in the summaries and helpers."""
        price = await client.v1.prices.create_async(legacy_price_params(scenario.product, mode))
        sub = await client.v1.subscriptions.create_async(
            {"customer": scenario.customer, "items": [{"price": price.id}]}
        )
        item = sub["items"]["data"][0]["id"]
        standin.clock.set(START + 8 * DAY)
        for ts, quantity, action in FIRST_PERIOD:
            await usage_record(client, item, quantity, timestamp=ts, action=action)
        standin.clock.set(MONTH_LATER + 4 * DAY)
        for ts, quantity, action in SECOND_PERIOD:
            await usage_record(client, item, quantity, timestamp=ts, action=action)
        standin.clock.set(MARCH_15 + 5 * DAY)
        third, second, first = await usage_summaries(client, item)
        assert [s["period"] for s in (first, second, third)] == [
            {"start": START, "end": MONTH_LATER},
            {"start": MONTH_LATER, "end": MARCH_15},
            {"start": MARCH_15, "end": 1_744_718_400},  # 2025-04-15T12:00:00Z
        ]
        totals = (first["total_usage"], second["total_usage"], third["total_usage"])
        assert totals == AGGREGATES[mode]
        helpers = tuple(
            standin.legacy_total(item, start) for start in (START, MONTH_LATER, MARCH_15)
        )
        assert helpers == AGGREGATES[mode]


# (seconds after the window's start, value, identifier); the window is [START, START + 1 day).
EVENTS = [
    (60, "5", "a"),
    (120, "3", "b"),
    (180, "10", "c"),
    (200, "100", "cancelled"),
    (240, "2", "d"),
    (260, "50", "refused"),  # accepted, then refused by Stripe's asynchronous checks
    (DAY, "70", "next-window"),  # the window's end is not in it
]
# Per formula, worked out by hand: counted events a, b, c, d (5, 3, 10, 2 in time order).
FORMULAS = {"sum": 20.0, "count": 4.0, "last": 2.0}


async def _meter(client: stripe.StripeClient, name: str, formula: str, **extra: Any) -> str:
    params: Any = {
        "display_name": name,
        "event_name": name,
        "default_aggregation": {"formula": formula},
    }
    params.update(extra)
    return str((await client.v1.billing.meters.create_async(params)).id)


async def _event(
    client: stripe.StripeClient, name: str, customer: str, ts: int, value: str, identifier: str
) -> None:
    await client.v1.billing.meter_events.create_async(
        {
            "event_name": name,
            "payload": {"stripe_customer_id": customer, "value": value},
            "timestamp": ts,
            "identifier": identifier,
        }
    )


async def _aggregated(
    client: stripe.StripeClient, meter: str, customer: str, start: int, end: int, **grouping: str
) -> list[float]:
    """``event_summaries``' values, as dualwrite's reconcile reads them."""
    params: Any = {"customer": customer, "start_time": start, "end_time": end, **grouping}
    found = await client.v1.billing.meters.event_summaries.list_async(meter, params)
    return [s["aggregated_value"] for s in found.data]


class TestMeterFormulas:
    """Every ``default_aggregation.formula``, with cancellations, late refusals and windows."""

    @pytest.mark.parametrize("formula", sorted(FORMULAS))
    async def test_hand_worked_formula(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin, formula: str
    ) -> None:
        """The window's aggregate is the hand-worked one, in the summaries and the helper."""
        name = f"calls_{formula}"
        meter = await _meter(client, name, formula)
        standin.clock.set(START + DAY + HOUR)
        for offset, value, identifier in EVENTS:
            await _event(client, name, scenario.customer, START + offset, value, identifier)
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": name, "type": "cancel", "cancel": {"identifier": "cancelled"}}
        )
        standin.refuse_later("refused", code="meter_event_invalid_value")
        window = (START, START + DAY)
        assert await _aggregated(client, meter, scenario.customer, *window) == [FORMULAS[formula]]
        assert standin.meter_total(scenario.customer, name, *window) == FORMULAS[formula]

    async def test_last_of_an_empty_window_is_zero(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """With ``last``, a window without events bills 0 (Stripe's migration guide)."""
        meter = await _meter(client, "calls_last_empty", "last")
        await _event(client, "calls_last_empty", scenario.customer, START - HOUR, "9", "before")
        assert await _aggregated(client, meter, scenario.customer, START, START + HOUR) == [0.0]

    async def test_hourly_window_keeps_the_newest_event(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """``event_time_window=hour``: per hour only the newest event counts (5 then 3 in the
        first hour: 3; 4 in the second), so the sum is 7; grouped by hour, 3 and 4."""
        meter = await _meter(client, "calls_hourly", "sum", event_time_window="hour")
        standin.clock.set(START + 3 * HOUR)
        for offset, value, identifier in (
            (5 * 60, "5", "h1"),
            (30 * 60, "3", "h2"),
            (70 * 60, "4", "h3"),
        ):
            await _event(
                client, "calls_hourly", scenario.customer, START + offset, value, identifier
            )
        span = (START, START + 2 * HOUR)
        assert await _aggregated(client, meter, scenario.customer, *span) == [7.0]
        hourly = await _aggregated(
            client, meter, scenario.customer, *span, value_grouping_window="hour"
        )
        assert hourly == [3.0, 4.0]
        assert standin.meter_total(scenario.customer, "calls_hourly", *span) == 7.0
