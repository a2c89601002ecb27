"""Ledger periods: each item's billing period, read from Stripe once and cached; else the UTC day."""

from __future__ import annotations

import time

import pytest

from dualwrite.models import Stage
from dualwrite.periods import ItemPeriods, Period
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import ScenarioBuilder, set_stage, usage

pytestmark = pytest.mark.anyio

MONTH = 31 * 86_400


class TestPeriodIds:
    """Period ids name UTC days and billing periods, and parse back."""

    def test_day(self):
        """A UTC day's id is its date; it spans 24 hours."""
        period = Period.day_of(1_795_600_000)
        assert period.id == "2026-11-25" and period.end - period.start == 86_400
        assert Period.parse(period.id) == period

    def test_billing(self):
        """A billing period's id is start/end in compact ISO form; it parses back."""
        period = Period(start=1_793_491_200, end=1_796_083_200, kind="billing")
        assert period.id == "20261101T000000Z/20261201T000000Z"
        assert Period.parse(period.id) == period

    def test_earlier_and_later_periods_follow_from_one(self):
        """From one monthly period, the ones before and after are calendar months."""
        known = ItemPeriods(start=1_793_491_200, end=1_796_083_200, interval="month")
        october = known.containing(1_793_491_200 - 1)
        assert october.id == "20261001T000000Z/20261101T000000Z"
        assert known.containing(1_796_083_200).id == "20261201T000000Z/20270101T000000Z"


class TestLedgerPeriods:
    """The ledger counts each event in its item's billing period."""

    async def test_event_lands_in_its_items_period(
        self, engine, standin_url, standin: StripeStandin
    ):
        """The period is the one Stripe reports for the item; Stripe is read once."""
        builder = ScenarioBuilder(standin_url, STRIPE_KEY)
        scenario = await builder.customer()
        item = await builder.client.v1.subscription_items.retrieve_async(scenario.item)
        await builder.aclose()
        expected = Period(
            start=item["current_period_start"], end=item["current_period_end"], kind="billing"
        )
        standin.reset_requests()
        for quantity in (1, 2, 3):
            await engine.record(usage(scenario, quantity))
        [row] = await engine.ledger.rows(customer=scenario.customer)
        assert row.period == expected.id and row["quantity"] == 6
        reads = [
            r for r in standin.requests if r.method == "GET" and "subscription_items" in r.path
        ]
        assert len(reads) == 1

    async def test_next_period_after_the_boundary(self, engine, standin_url, standin):
        """Once Stripe's clock passes the period end, new usage counts in the next period."""
        builder = ScenarioBuilder(standin_url, STRIPE_KEY)
        scenario = await builder.customer()
        await builder.aclose()
        await set_stage(engine, scenario.customer, Stage.METER)
        now = int(time.time())
        await engine.record(usage(scenario, 5, timestamp=now))
        standin.clock.advance(MONTH)
        await engine.record(usage(scenario, 7, timestamp=now + MONTH))
        rows = sorted(await engine.ledger.rows(customer=scenario.customer), key=lambda r: r.period)
        assert [row["quantity"] for row in rows] == [5, 7]
        first, second = (row.span for row in rows)
        assert first.kind == second.kind == "billing" and first.end == second.start

    async def test_no_item_means_utc_day(self, engine, standin_url):
        """An event without a subscription item counts in its UTC day."""
        builder = ScenarioBuilder(standin_url, STRIPE_KEY)
        scenario = await builder.customer()
        await builder.aclose()
        await set_stage(engine, scenario.customer, Stage.METER)
        event = usage(scenario, 2).model_copy(update={"subscription_item": None})
        await engine.record(event)
        [row] = await engine.ledger.rows(customer=scenario.customer)
        assert row.period == event.period and row.span.kind == "day"
