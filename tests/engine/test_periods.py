"""Ledger periods: each item's billing period, read from Stripe once and cached; else the UTC day."""

from __future__ import annotations

import logging
import time

import pytest

from dualwrite.models import Stage
from dualwrite.periods import Interval, ItemPeriods, Period
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import (
    LEGACY_VERSION,
    ScenarioBuilder,
    anchored_on,
    set_stage,
    usage,
    utc,
)

pytestmark = pytest.mark.anyio

MONTH = 31 * 86_400
#: Stripe's rule: the anchor sets the day of week (week), the day of month (month, year) and the
#: month (year); an anchor on the 31st bills on the last day of shorter months, then on the 31st
#: again (Jan 31 → Feb 28, or Feb 29 in a leap year → Mar 31 → Apr 30); full periods are
#: interval-aligned with the anchor; a weekly anchor on Friday June 3 bills every Friday.
CYCLE_DOC = "docs.stripe.com/billing/subscriptions/billing-cycle"
#: ``recurring.interval_count``: "interval=month and interval_count=3 bills every 3 months".
COUNT_DOC = "docs.stripe.com/api/prices/object (recurring.interval_count)"


#: Worked out by hand from the pages named in each row. Columns: anchor, interval, count, the
#: current period Stripe reported when the item was read (what is cached), the event's time, the
#: period Stripe bills that event in, and the source.
HAND_WORKED: list[tuple[str, Interval, int, tuple[str, str], str, tuple[str, str], str]] = [
    # An anchor on the 31st: the issue's own case (Mar 30 is in [Feb 28, Mar 31), not Mar 28).
    ("2027-01-31", "month", 1, ("2027-02-28", "2027-03-31"), "2027-03-30T12:00:00",
     ("2027-02-28", "2027-03-31"), CYCLE_DOC),
    ("2027-01-31", "month", 1, ("2027-02-28", "2027-03-31"), "2027-04-15",
     ("2027-03-31", "2027-04-30"), CYCLE_DOC),
    ("2027-01-31", "month", 1, ("2027-02-28", "2027-03-31"), "2027-05-31",
     ("2027-05-31", "2027-06-30"), CYCLE_DOC),
    ("2027-01-31", "month", 1, ("2027-02-28", "2027-03-31"), "2027-06-30",
     ("2027-06-30", "2027-07-31"), CYCLE_DOC),
    ("2027-01-31", "month", 1, ("2027-02-28", "2027-03-31"), "2027-02-10",
     ("2027-01-31", "2027-02-28"), CYCLE_DOC),
    # A leap year: Feb 29.
    ("2028-01-31", "month", 1, ("2028-01-31", "2028-02-29"), "2028-03-01",
     ("2028-02-29", "2028-03-31"), CYCLE_DOC),
    # Anchors on the 29th and 30th (and a time of day: boundaries keep it).
    ("2027-01-29", "month", 1, ("2027-02-28", "2027-03-29"), "2027-03-29",
     ("2027-03-29", "2027-04-29"), CYCLE_DOC),
    ("2027-01-29", "month", 1, ("2027-02-28", "2027-03-29"), "2027-03-28T23:59:59",
     ("2027-02-28", "2027-03-29"), CYCLE_DOC),
    ("2027-01-30T08:00:00", "month", 1, ("2027-02-28T08:00:00", "2027-03-30T08:00:00"),
     "2027-04-30T07:59:59", ("2027-03-30T08:00:00", "2027-04-30T08:00:00"), CYCLE_DOC),
    ("2027-01-30T08:00:00", "month", 1, ("2027-02-28T08:00:00", "2027-03-30T08:00:00"),
     "2027-05-01", ("2027-04-30T08:00:00", "2027-05-30T08:00:00"), CYCLE_DOC),
    # Yearly, anchored on a leap day: the day of month and the month, clamped as above.
    ("2028-02-29", "year", 1, ("2028-02-29", "2029-02-28"), "2029-03-01",
     ("2029-02-28", "2030-02-28"), CYCLE_DOC),
    ("2028-02-29", "year", 1, ("2028-02-29", "2029-02-28"), "2032-03-01",
     ("2032-02-29", "2033-02-28"), CYCLE_DOC),
    # Weekly: the docs' own example, Friday June 3, every Friday; and every two weeks.
    ("2022-06-03", "week", 1, ("2022-06-03", "2022-06-10"), "2022-06-15",
     ("2022-06-10", "2022-06-17"), CYCLE_DOC),
    ("2022-06-03", "week", 2, ("2022-06-17", "2022-07-01"), "2022-07-02",
     ("2022-07-01", "2022-07-15"), f"{CYCLE_DOC}; {COUNT_DOC}"),
    # Every three months from Nov 30: Feb 28, May 30, Aug 30 (never May 28).
    ("2026-11-30", "month", 3, ("2027-02-28", "2027-05-30"), "2027-06-01",
     ("2027-05-30", "2027-08-30"), f"{CYCLE_DOC}; {COUNT_DOC}"),
    # Every two days, anchored at noon.
    ("2027-03-10T12:00:00", "day", 2, ("2027-03-12T12:00:00", "2027-03-14T12:00:00"),
     "2027-03-17T08:00:00", ("2027-03-16T12:00:00", "2027-03-18T12:00:00"), COUNT_DOC),
    # A first, partial period up to a later anchor is Stripe's own; full periods follow the anchor.
    ("2027-02-01", "month", 1, ("2027-01-15", "2027-02-01"), "2027-01-20",
     ("2027-01-15", "2027-02-01"), CYCLE_DOC),
    ("2027-02-01", "month", 1, ("2027-01-15", "2027-02-01"), "2027-02-10",
     ("2027-02-01", "2027-03-01"), CYCLE_DOC),
]  # fmt: skip


@pytest.mark.parametrize(
    ("anchor", "interval", "count", "cached", "at", "expected", "source"), HAND_WORKED
)
def test_month_end_anchors_follow_stripes_billing_cycle(
    anchor, interval, count, cached, at, expected, source
):
    """Each row's period, from the cached current period and the anchor, is Stripe's (``source``)."""
    known = ItemPeriods(
        start=utc(cached[0]),
        end=utc(cached[1]),
        interval=interval,
        interval_count=count,
        anchor=utc(anchor),
    )
    period = known.containing(utc(at))
    assert (period.start, period.end) == (utc(expected[0]), utc(expected[1])), source


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


async def stripe_period(builder: ScenarioBuilder, item: str) -> str:
    """The item's current billing period as Stripe reports it, as a ledger period id."""
    found = await builder.client.v1.subscription_items.retrieve_async(
        item, options={"stripe_version": LEGACY_VERSION}
    )
    start, end = found["current_period_start"], found["current_period_end"]
    return Period(start=start, end=end, kind="billing").id


class TestMonthEndLedgerPeriods:
    """The ledger's period ids are Stripe's for an anchor on the 31st, read failures included."""

    async def test_month_end_anchor_ledger_periods_are_stripes(
        self, engine, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """Anchored Jan 31: usage on Mar 30, Apr 15 and after a failed read at the May rollover
        lands in Stripe's own periods, never a UTC day."""
        scenario = await anchored_on(builder, standin, utc("2027-01-31"))
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        expected = []
        for when in ("2027-03-30T12:00:00", "2027-04-15T00:00:00"):
            standin.clock.set(utc(when) + 60)
            outcome = await engine.record(usage(scenario, 1, timestamp=utc(when)))
            assert outcome.accepted, outcome.authoritative.failure
            expected.append(await stripe_period(builder, scenario.item))
        # The rollover to May: every read of the item fails; the period follows from the anchor.
        standin.clock.set(utc("2027-05-05") + 60)
        standin.faults.refuse(
            path=rf"/v1/subscription_items/{scenario.item}", status=500, type="api_error"
        )
        outcome = await engine.record(usage(scenario, 1, timestamp=utc("2027-05-05")))
        assert outcome.accepted, outcome.authoritative.failure
        standin.faults.clear()
        expected.append(await stripe_period(builder, scenario.item))
        rows = await engine.ledger.rows(customer=scenario.customer)
        assert sorted(row.period for row in rows) == expected
        assert expected == [
            "20270228T000000Z/20270331T000000Z",
            "20270331T000000Z/20270430T000000Z",
            "20270430T000000Z/20270531T000000Z",
        ]

    async def test_one_failed_read_at_rollover_is_retried(
        self, engine, builder: ScenarioBuilder, standin: StripeStandin, caplog
    ):
        """A single 500 (or 429) on the item read at a rollover is retried: the period is read,
        not guessed, and nothing is filed under a UTC day."""
        scenario = await anchored_on(builder, standin, utc("2027-01-31"))
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        standin.clock.set(utc("2027-02-10") + 60)
        standin.faults.refuse(
            path=rf"/v1/subscription_items/{scenario.item}",
            status=429,
            count=1,
            type="invalid_request_error",
            code="rate_limit",
        )
        with caplog.at_level(logging.WARNING, logger="dualwrite"):
            await engine.record(usage(scenario, 1, timestamp=utc("2027-02-10")))
        [row] = await engine.ledger.rows(customer=scenario.customer)
        assert row.period == "20270131T000000Z/20270228T000000Z"
        assert "billing period" not in caplog.text
