"""The stand-in's calendar against dates worked out by hand from Stripe's documentation.

Every row names the page its rule comes from. The dates were worked out on paper (a calendar of
2022 and 2024-2029 at hand), not computed by the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import stripe
from hypothesis import given, strategies as st

from stripe_standin import StripeStandin
from stripe_standin._calendar import (
    Grouping,
    Interval,
    boundary,
    is_aligned,
    meter_event_problem,
    period_at,
    subscription_period,
    usage_record_problem,
)
from tests.standin.standin_support import SDK_WARNING, Scenario

BILLING_CYCLE = "docs.stripe.com/billing/subscriptions/billing-cycle"
USAGE_RECORD_CREATE = "docs.stripe.com/api/usage_records/create"
METER_EVENT_CREATE = "docs.stripe.com/api/billing/meter-event/create"
EVENT_SUMMARIES = "docs.stripe.com/api/billing/meter-event-summary/list"
PRICE_RECURRING = "docs.stripe.com/api/prices/create (recurring.interval, recurring.interval_count)"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """A UTC wall-clock time as Unix seconds."""
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


@dataclass(frozen=True)
class Row:
    """One hand-worked billing period: the cycle, a moment, and the period holding it."""

    source: str
    anchor: int
    interval: Interval
    count: int
    at: int
    start: int
    end: int
    why: str


PERIODS = [
    Row(BILLING_CYCLE, utc(2024, 9, 2), "month", 1, utc(2024, 10, 15),
        utc(2024, 10, 2), utc(2024, 11, 2), "anchored Sep 2: always bills on the 2nd"),
    Row(BILLING_CYCLE, utc(2025, 1, 31), "month", 1, utc(2025, 2, 10),
        utc(2025, 1, 31), utc(2025, 2, 28), "anchored Jan 31: first period ends Feb 28"),
    Row(BILLING_CYCLE, utc(2025, 1, 31), "month", 1, utc(2025, 3, 1),
        utc(2025, 2, 28), utc(2025, 3, 31), "…then Mar 31 (not Mar 28)"),
    Row(BILLING_CYCLE, utc(2025, 1, 31), "month", 1, utc(2025, 4, 15),
        utc(2025, 3, 31), utc(2025, 4, 30), "…then Apr 30"),
    Row(BILLING_CYCLE, utc(2025, 1, 31), "month", 1, utc(2025, 5, 2),
        utc(2025, 4, 30), utc(2025, 5, 31), "…then back to the 31st in May"),
    Row(BILLING_CYCLE, utc(2024, 1, 31), "month", 1, utc(2024, 3, 5),
        utc(2024, 2, 29), utc(2024, 3, 31), "Feb 29 in a leap year"),
    Row(BILLING_CYCLE, utc(2025, 1, 30), "month", 1, utc(2025, 3, 15),
        utc(2025, 2, 28), utc(2025, 3, 30), "anchored on the 30th: Feb 28, then Mar 30"),
    Row(BILLING_CYCLE, utc(2025, 1, 29), "month", 1, utc(2025, 3, 1),
        utc(2025, 2, 28), utc(2025, 3, 29), "anchored on the 29th, common year"),
    Row(BILLING_CYCLE, utc(2024, 1, 29), "month", 1, utc(2024, 2, 29, 12),
        utc(2024, 2, 29), utc(2024, 3, 29), "anchored on the 29th, leap year: Feb 29 itself"),
    Row(BILLING_CYCLE, utc(2025, 1, 31, 8), "month", 1, utc(2025, 2, 28, 7),
        utc(2025, 1, 31, 8), utc(2025, 2, 28, 8), "the anchor's time of day is kept"),
    Row(BILLING_CYCLE, utc(2025, 1, 31), "month", 1, utc(2025, 2, 28),
        utc(2025, 2, 28), utc(2025, 3, 31), "a period holds its start…"),
    Row(BILLING_CYCLE, utc(2025, 1, 31), "month", 1, utc(2025, 2, 27, 23, 59, 59),
        utc(2025, 1, 31), utc(2025, 2, 28), "…and not its end"),
    Row(BILLING_CYCLE, utc(2025, 3, 31), "month", 1, utc(2025, 3, 10),
        utc(2025, 2, 28), utc(2025, 3, 31), "the cycle before its anchor, counted back"),
    Row(BILLING_CYCLE, utc(2022, 6, 3), "week", 1, utc(2022, 6, 15),
        utc(2022, 6, 10), utc(2022, 6, 17), "weekly from Friday Jun 3: every Friday"),
    Row(PRICE_RECURRING, utc(2022, 6, 3), "week", 2, utc(2022, 6, 20),
        utc(2022, 6, 17), utc(2022, 7, 1), "every other Friday"),
    Row(PRICE_RECURRING, utc(2025, 1, 1, 6), "day", 3, utc(2025, 1, 5),
        utc(2025, 1, 4, 6), utc(2025, 1, 7, 6), "every 3 days from 06:00"),
    Row(PRICE_RECURRING, utc(2025, 1, 31), "month", 3, utc(2025, 5, 10),
        utc(2025, 4, 30), utc(2025, 7, 31), "quarterly from Jan 31: Apr 30, then Jul 31"),
    Row(PRICE_RECURRING, utc(2025, 1, 31), "month", 3, utc(2025, 11, 1),
        utc(2025, 10, 31), utc(2026, 1, 31), "quarterly: Oct 31 to Jan 31"),
    Row(BILLING_CYCLE, utc(2024, 2, 29), "year", 1, utc(2025, 6, 1),
        utc(2025, 2, 28), utc(2026, 2, 28), "yearly from Feb 29: Feb 28 in common years"),
    Row(BILLING_CYCLE, utc(2024, 2, 29), "year", 1, utc(2028, 3, 1),
        utc(2028, 2, 29), utc(2029, 2, 28), "…and Feb 29 again in 2028"),
]  # fmt: skip


def _label(row: Row) -> str:
    return row.why


class TestBillingPeriods:
    """Billing periods from the anchor, by the hand-worked table."""

    @pytest.mark.parametrize("row", PERIODS, ids=_label)
    def test_hand_worked_period(self, row: Row) -> None:
        """The period holding the moment is the one worked out by hand from the named page."""
        assert period_at(row.anchor, row.interval, row.count, row.at) == (row.start, row.end), (
            row.source
        )

    def test_month_end_boundaries_never_drift(self) -> None:
        """Anchored Jan 31, boundaries over a year are each month's last day or the 31st
        (billing-cycle page): never the clamped day carried forward."""
        jan_31 = utc(2025, 1, 31)
        days = [datetime.fromtimestamp(boundary(jan_31, "month", 1, n), UTC).day for n in range(13)]
        assert days == [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31]

    def test_prorated_first_period_before_a_later_anchor(self) -> None:
        """Created Mar 5 with an anchor on Mar 31, the first period is Mar 5 to Mar 31, then full
        periods follow ("full billing periods start on the first full invoice date")."""
        created, anchor = utc(2025, 3, 5, 9), utc(2025, 3, 31)
        first = subscription_period(
            created=created, anchor=anchor, interval="month", interval_count=1, ts=utc(2025, 3, 10)
        )
        assert first == (created, anchor)
        second = subscription_period(
            created=created, anchor=anchor, interval="month", interval_count=1, ts=anchor
        )
        assert second == (utc(2025, 3, 31), utc(2025, 4, 30))

    @given(
        anchor=st.integers(min_value=0, max_value=4_000_000_000),
        offset=st.integers(min_value=-400_000_000, max_value=400_000_000),
        interval=st.sampled_from(["day", "week", "month", "year"]),
        count=st.integers(min_value=1, max_value=3),
    )
    def test_period_holds_its_timestamp(
        self, anchor: int, offset: int, interval: Interval, count: int
    ) -> None:
        """The period found for a time contains it, and its start finds the same period."""
        ts = max(anchor + offset, 0)
        start, end = period_at(anchor, interval, count, ts)
        assert start <= ts < end
        assert period_at(anchor, interval, count, start) == (start, end)


PERIOD_START, NOW = utc(2025, 2, 28), utc(2025, 3, 10, 12)

USAGE_TIMESTAMPS = [
    (NOW, None, "now itself is fine"),
    (NOW + 1, "future", "one second ahead is in the future"),
    (PERIOD_START, None, "the period's first second is inside it"),
    (PERIOD_START - 1, "before_period", "the previous period's last second is not"),
]

METER_TIMESTAMPS = [
    (NOW - 35 * 86_400, None, "exactly 35 days back"),
    (NOW - 35 * 86_400 - 1, "too_old", "a second more than 35 days back"),
    (NOW + 300, None, "exactly 5 minutes ahead"),
    (NOW + 301, "future", "a second more than 5 minutes ahead"),
]

ALIGNMENTS: list[tuple[int, Grouping, bool]] = [
    (utc(2025, 3, 10, 12, 34), "minute", True),
    (utc(2025, 3, 10, 12, 34, 5), "minute", False),
    (utc(2025, 3, 10, 12), "hour", True),
    (utc(2025, 3, 10, 12, 30), "hour", False),
    (utc(2025, 3, 10), "day", True),
    (utc(2025, 3, 10, 1), "day", False),
]


class TestTimestampRules:
    """Which timestamps Stripe takes for usage records and meter events, and summary bounds."""

    @pytest.mark.parametrize(("ts", "problem", "why"), USAGE_TIMESTAMPS, ids=lambda v: str(v))
    def test_usage_record_timestamps(self, ts: int, problem: str | None, why: str) -> None:
        """Inside the current period and not in the future (USAGE_RECORD_CREATE)."""
        assert usage_record_problem(ts, now=NOW, period_start=PERIOD_START) == problem, why

    @pytest.mark.parametrize(("ts", "problem", "why"), METER_TIMESTAMPS, ids=lambda v: str(v))
    def test_meter_event_timestamps(self, ts: int, problem: str | None, why: str) -> None:
        """Within the past 35 days or up to 5 minutes ahead (METER_EVENT_CREATE)."""
        assert meter_event_problem(ts, now=NOW) == problem, why

    @pytest.mark.parametrize(("ts", "grouping", "aligned"), ALIGNMENTS)
    def test_summary_bounds_alignment(self, ts: int, grouping: Grouping, aligned: bool) -> None:
        """Minute boundaries always; hours or UTC midnights per value_grouping_window
        (EVENT_SUMMARIES)."""
        assert is_aligned(ts, grouping) is aligned


@pytest.mark.anyio
@SDK_WARNING
class TestThroughTheApi:
    """The calendar as a client sees it: subscription periods and schedule phases."""

    async def test_periods_of_a_31st_anchor_over_a_year(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """``current_period_start``/``end`` of a subscription anchored Jan 31 walk the month ends."""
        standin.clock.set(utc(2025, 1, 31, 1))
        sub = await client.v1.subscriptions.create_async(
            {"customer": scenario.customer, "items": [{"price": scenario.legacy_price}]}
        )
        seen = []
        for month in range(2, 14):
            year, month = (2025, month) if month <= 12 else (2026, month - 12)
            standin.clock.set(utc(year, month, 15))
            current = await client.v1.subscriptions.retrieve_async(sub.id)
            seen.append(datetime.fromtimestamp(current["current_period_end"], UTC).date())
        assert [(d.month, d.day) for d in seen] == [
            (2, 28), (3, 31), (4, 30), (5, 31), (6, 30), (7, 31),
            (8, 31), (9, 30), (10, 31), (11, 30), (12, 31), (1, 31),
        ]  # fmt: skip

    async def test_schedule_phase_of_one_period_ends_on_the_anchor_day(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """From the clamped Feb 28, a one-period phase ends Mar 31 (billing-cycle page), not Mar 28."""
        standin.clock.set(utc(2025, 1, 31, 1))
        sub = await client.v1.subscriptions.create_async(
            {
                "customer": scenario.customer,
                "items": [{"price": scenario.legacy_price}],
                "billing_cycle_anchor": utc(2025, 1, 31),
            }
        )
        standin.clock.set(utc(2025, 3, 1))
        schedule = await client.v1.subscription_schedules.create_async(
            {"from_subscription": sub.id}
        )
        # ``iterations`` is gone from stripe-python's typed parameters (newer API versions).
        phases: Any = [
            {"items": [{"price": scenario.legacy_price}], "iterations": 1},
            {"items": [{"price": scenario.meter_price}], "iterations": 1},
        ]
        updated = await client.v1.subscription_schedules.update_async(
            schedule.id, {"phases": phases}
        )
        ends = [phase["end_date"] for phase in updated["phases"]]
        assert ends == [utc(2025, 3, 31), utc(2025, 4, 30)]
