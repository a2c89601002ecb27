"""dualwrite's ledger periods against the stand-in's own subscription periods, for month-end anchors.

The stand-in computes billing periods with its own calendar (``stripe_standin._calendar``, written
from Stripe's billing-cycle page); dualwrite's ledger files each event under the period its
``PeriodResolver`` finds. For subscriptions anchored on the 29th, 30th and 31st (in a leap year and
in a common one), usage is recorded through the engine an hour after each period starts and an
hour before it ends, over a year, and the ledger's period ids must be the stand-in's.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.periods import Period
from stripe_standin import StripeStandin
from tests.support import ScenarioBuilder, set_stage, usage

pytestmark = pytest.mark.anyio

HOUR = 3600
PERIODS = 12
"""A year of monthly periods: a clamped day (Feb 28) must not be carried forward (Mar 28)."""
ANCHORS = [datetime(year, 1, day, tzinfo=UTC) for year in (2024, 2025) for day in (29, 30, 31)]


@pytest.mark.parametrize("anchor", ANCHORS, ids=lambda d: d.date().isoformat())
async def test_ledger_periods_are_stripes_over_a_year(
    engine: DualWriteEngine,
    builder: ScenarioBuilder,
    standin: StripeStandin,
    anchor: datetime,
) -> None:
    """Every ledger period id of a month-end-anchored customer is a period the stand-in reported,
    and the events of each stand-in period land in it."""
    standin.clock.set(int(anchor.timestamp()))
    scenario = await builder.customer()
    await set_stage(engine, scenario.customer, Stage.METER)
    expected: set[str] = set()
    at = int(anchor.timestamp()) + HOUR
    for _ in range(PERIODS):
        for moment in ("start", "end"):
            standin.clock.set(at)
            sub = await builder.client.v1.subscriptions.retrieve_async(scenario.subscription)
            start, end = sub["current_period_start"], sub["current_period_end"]
            expected.add(Period(start=start, end=end, kind="billing").id)
            await engine.record(usage(scenario, 1, timestamp=at))
            at = end - HOUR if moment == "start" else end + HOUR
    rows = await engine.ledger.rows(customer=scenario.customer)
    assert sorted(row.period for row in rows) == sorted(expected)
    assert all(row["quantity"] == 2 for row in rows)
