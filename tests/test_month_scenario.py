"""Three months of migration on Stripe test clocks, as a payments team would run it (issue 21).

Customers anchored on the 1st, 15th, 28th, 29th, 30th and 31st live on Stripe test clocks on the
stand-in; the test drives the clocks day by day over three months. Usage goes through the engine
with a worker and a few % Stripe faults (the caller retries as the SDKs do); `rollout shadow` 25 %
then 100 %; a first wave `cutover --to primary --at period-end --with-schedule`; one rollback with
its schedule released; a second wave to `meter`; the guard at its default settings every day; one
customer given a planted divergence. At the end every customer is at the stage planned for it, no
usage was refused, every closed period is exact on the meter leg (and on the legacy leg until the
item moved to its meter-backed price) per the stand-in's summaries, and the guard rolled back only
the planted customer.
"""

from __future__ import annotations

import calendar
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import pytest

from dualwrite.config import Settings
from dualwrite.cutover import CutoverOps
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import StageResolver
from dualwrite.models import Stage
from dualwrite.test_clocks import StripeTestClocks
from dualwrite.testing import StripeStandin
from tests.conftest import SettingsFactory
from tests.support import (
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    legacy_summaries,
    meter_summary,
    usage,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DAY = 86_400
DAYS = 92
ANCHOR_DAYS = (1, 15, 28, 29, 30, 31)
PER_ANCHOR = 4  # 24 customers
FAULT_RATE = 0.03


def jan(day: int) -> int:
    """Midnight UTC on ``day`` January 2026 (every clock starts there, before the process now)."""
    return calendar.timegm(datetime(2026, 1, day, tzinfo=UTC).timetuple())


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """Billing-period ledger, default guardrails."""
    return standin_settings()


class Month:
    """The customers, their clocks, and what the callers were told."""

    def __init__(self, builder: ScenarioBuilder) -> None:
        self.builder = builder
        self.customers: list[Scenario] = []
        self.clocks: dict[str, tuple[str, int]] = {}  # customer -> (clock, start)
        self.intended: dict[str, list[tuple[int, int]]] = {}
        self.day = 0

    def now(self) -> float:
        """The scenario's time (the operations judge the guard's window by it)."""
        return float(jan(1) + self.day * DAY)

    async def add(self, anchor_day: int, index: int) -> Scenario:
        """A customer on its own clock, subscribed on ``anchor_day`` January (its anchor)."""
        legacy, metered, meter = await self.builder._catalog()
        start = jan(anchor_day)
        client = self.builder.client
        clock = await client.v1.test_helpers.test_clocks.create_async({"frozen_time": start})
        customer = await client.v1.customers.create_async(
            {"name": f"anchor {anchor_day} #{index}", "test_clock": clock.id}
        )
        sub = await client.v1.subscriptions.create_async(
            {"customer": customer.id, "items": [{"price": legacy}]},
            {"stripe_version": LEGACY_VERSION},
        )
        scenario = Scenario(
            customer.id, sub.id, sub["items"]["data"][0]["id"], legacy, metered, meter
        )
        self.customers.append(scenario)
        self.clocks[scenario.customer] = (clock.id, start)
        return scenario

    def clock_time(self, scenario: Scenario) -> int:
        """The customer's clock time on the scenario's current day (not before its start)."""
        _, start = self.clocks[scenario.customer]
        return max(start, jan(1) + self.day * DAY)

    async def advance(self) -> None:
        """One day forward on every clock that has started."""
        self.day += 1
        tc = self.builder.client.v1.test_helpers.test_clocks
        for scenario in self.customers:
            clock, start = self.clocks[scenario.customer]
            target = jan(1) + self.day * DAY
            if target > start:
                await tc.advance_async(clock, {"frozen_time": target})
        for scenario in self.customers:
            await tc.retrieve_async(self.clocks[scenario.customer][0])  # the advance is done


async def send(
    engine: DualWriteEngine, month: Month, scenario: Scenario, rng: random.Random
) -> None:
    """One usage event at the customer's clock time, retried (same identifier) until accepted,
    as an SDK retries a 500 or a 429; a refusal fails the test."""
    quantity = rng.randint(1, 9)
    ts = month.clock_time(scenario)
    identifier = f"m-{scenario.customer}-{month.day}"
    for _ in range(50):
        outcome = await engine.record(
            usage(scenario, quantity, identifier=identifier, timestamp=ts)
        )
        if outcome.accepted:
            month.intended.setdefault(scenario.customer, []).append((ts, quantity))
            return
        failure = outcome.authoritative.failure
        assert failure is not None and failure.retryable, (scenario.customer, outcome)
    pytest.fail(f"usage of {scenario.customer} on day {month.day} never accepted")


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[DualWriteEngine]:
    """The engine (the worker is driven by the test)."""
    made = DualWriteEngine.from_settings(settings)
    await made.start(worker=False)
    yield made
    await made.aclose()


async def test_three_months_on_test_clocks(
    settings: Settings, engine: DualWriteEngine, builder: ScenarioBuilder, standin: StripeStandin
) -> None:
    """Every customer ends at its planned stage, nothing refused, every closed period exact,
    and the guard rolls back only the customer with a planted divergence."""
    month = Month(builder)
    for anchor_day in ANCHOR_DAYS:
        for index in range(PER_ANCHOR):
            await month.add(anchor_day, index)
    planted = month.customers[1]  # anchored on the 1st
    rolled_back = month.customers[PER_ANCHOR]  # the first on the 15th
    wave1 = [s for s in month.customers if s not in (planted, rolled_back)][::2]
    wave1.append(rolled_back)
    wave2 = [s for s in wave1 if s is not rolled_back]
    ops = CutoverOps(engine.redis, engine.keys, settings, clock=month.now)
    resolver = engine.resolver
    assert isinstance(resolver, StageResolver) and isinstance(
        resolver.test_clocks, StripeTestClocks
    )
    rng = random.Random(21)
    trips: list[str] = []

    await ops.rollout(Stage.SHADOW, percent=25, actor="ann")
    await ops.rollout(Stage.SHADOW, percent=100, actor="ann")
    for day in range(DAYS):
        resolver.test_clocks.forget()  # the test moves clocks faster than the 5 s cache
        ops.test_clocks.forget()
        resolver.invalidate()
        if day == 3:
            for scenario in wave1:
                await ops.cutover(
                    scenario.customer,
                    Stage.PRIMARY,
                    at="period-end",
                    with_schedule=True,
                    price=scenario.meter_price,
                    actor="ann",
                )
        if day == 6:
            result = await ops.rollback(
                [rolled_back.customer], to=Stage.SHADOW, actor="ann", reason="not this one"
            )
            assert any("released Stripe schedule" in note for note in result.notes)
        if day == 20:
            standin.faults.refuse(
                path="/v1/billing/meter_events",
                where={"payload[stripe_customer_id]": planted.customer},
                code="parameter_invalid",
            )
        if day == 62:  # every first-wave period end (Feb 28 at the latest) is past
            for scenario in wave2:
                assert (await ops.stage_of(scenario.customer))[0] is Stage.PRIMARY
                await ops.cutover(scenario.customer, Stage.METER, at="period-end", actor="ann")
        standin.faults.configure(rate=FAULT_RATE, kinds=["500", "429"], seed=day)
        for scenario in month.customers:
            if month.clock_time(scenario) == month.now():
                await send(engine, month, scenario, rng)
        standin.faults.configure(rate=0.0, kinds=["500"])
        with anyio.fail_after(60):
            await engine.new_worker().drain()
        guard = await ops.guard_once()
        trips += [trip.customer for trip in guard.tripped]
        assert not guard.global_tripped
        await month.advance()

    assert trips == [planted.customer]
    planned = {s.customer: Stage.SHADOW for s in month.customers}
    planned |= {s.customer: Stage.METER for s in wave2}
    planned[planted.customer] = Stage.LEGACY
    resolver.invalidate()
    for scenario in month.customers:
        assert (await ops.stage_of(scenario.customer))[0] is planned[scenario.customer]
    # Every closed period exact per the stand-in's summaries: the meter leg always, the legacy
    # leg until the item moved to its meter-backed price.
    moved = {s.customer for s in wave2}
    checked = 0
    for scenario in month.customers:
        if scenario is planted:
            continue
        sent = month.intended.get(scenario.customer, [])
        for (start, end), legacy in (await legacy_summaries(builder.client, scenario.item)).items():
            if end > month.now():
                continue  # the current period is still open
            intended = sum(q for ts, q in sent if start <= ts < end)
            meter = await meter_summary(
                builder.client, scenario.meter, scenario.customer, start, end
            )
            assert meter == intended, (scenario.customer, start, meter, intended)
            if scenario.customer not in moved:
                assert legacy == intended, (scenario.customer, start, legacy, intended)
            checked += 1
    assert checked >= 2 * (len(month.customers) - 1)
