"""A customer whose subscription lives on a Stripe test clock is judged by the clock's time, and
the kill switch never sends a customer whose item moved to its meter-backed price to legacy.

Stripe is the stand-in over HTTP: its test clocks (``/v1/test_helpers/test_clocks``) move the
subscriptions on them, and apply their schedules' phases, by the clock's frozen time only."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.cutover import CutoverInputError, CutoverOps
from dualwrite.cutover._flagops import schedule_stage
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import CustomerBilling, StageResolver
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.test_clocks import StripeTestClocks
from dualwrite.testing import StripeStandin
from tests.conftest import SettingsFactory
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    cli_environment,
    cut_over_at_period_end,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio

DAY = 86_400


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """UTC-day ledger periods (the clock's periods are not what these tests check)."""
    return standin_settings(ledger={"periods": "day"})


@pytest.fixture
async def ops(redis_client: aioredis.Redis, settings: Settings) -> AsyncIterator[CutoverOps]:
    """Cutover operations on this test's prefix and the stand-in, on the process clock."""
    yield CutoverOps(redis_client, KeySpace(settings.redis.key_prefix), settings)


async def clock_customer(builder: ScenarioBuilder, frozen: int) -> tuple[Scenario, str]:
    """A customer on a new test clock frozen at ``frozen``, subscribed to the legacy price (its
    periods start at the clock's time); returns it and the clock's id."""
    catalog = await builder._catalog()
    clock = await builder.client.v1.test_helpers.test_clocks.create_async({"frozen_time": frozen})
    customer = await builder.client.v1.customers.create_async(
        {"name": "on a clock", "test_clock": clock.id}
    )
    subscription = await builder.client.v1.subscriptions.create_async(
        {"customer": customer.id, "items": [{"price": catalog[0]}]},
        {"stripe_version": LEGACY_VERSION},
    )
    item = subscription["items"]["data"][0]["id"]
    scenario = Scenario(customer.id, subscription.id, item, catalog[0], catalog[1], catalog[2])
    return scenario, clock.id


async def advance(builder: ScenarioBuilder, clock: str, to: int) -> None:
    """Advance the test clock (the stand-in finishes the advance at its next call)."""
    await builder.client.v1.test_helpers.test_clocks.advance_async(clock, {"frozen_time": to})
    await builder.client.v1.test_helpers.test_clocks.retrieve_async(clock)


async def item_price(builder: ScenarioBuilder, scenario: Scenario) -> str:
    """The item's price now, as Stripe reports it."""
    item = await builder.client.v1.subscription_items.retrieve_async(scenario.item)
    return str(item["price"]["id"])


async def scheduled(ops: CutoverOps, scenario: Scenario) -> int:
    """Cut a shadow customer over to primary at its period end with the schedule; the end."""
    end, _ = await cut_over_at_period_end(ops, scenario)
    return end


class TestTestClocks:
    """Period-end decisions for a customer on a test clock follow the clock's frozen time."""

    async def test_a_clock_in_the_past_keeps_the_cutover_pending_until_it_is_advanced(
        self, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """The period end is behind the process clock but ahead of the test clock: the customer
        stays at shadow (its usage records still accepted) until the clock passes the end, then
        moves to primary together with its price."""
        frozen = standin.clock.now() - 90 * DAY
        scenario, clock = await clock_customer(builder, frozen)
        end = await scheduled(ops, scenario)
        assert frozen < end < standin.clock.now()
        assert await ops.store.billing_of(scenario.customer) == CustomerBilling(
            test_clock=clock, price_move_at=end
        )
        assert (await ops.stage_of(scenario.customer))[0] is Stage.SHADOW
        assert await item_price(builder, scenario) == scenario.legacy_price
        await advance(builder, clock, end + 60)
        ops.test_clocks.forget()
        assert await item_price(builder, scenario) == scenario.meter_price
        assert (await ops.stage_of(scenario.customer))[0] is Stage.PRIMARY

    async def test_the_engine_follows_the_clock(
        self, ops: CutoverOps, builder: ScenarioBuilder, engine: DualWriteEngine
    ) -> None:
        """The request path resolves by the test clock too: a clock advanced past the period end
        (far ahead of the process clock) puts the customer at primary, so its usage is accepted
        on the meter leg instead of refused by the moved item's legacy endpoint."""
        scenario, clock = await clock_customer(builder, int(time.time()))
        end = await scheduled(ops, scenario)
        assert (await engine.resolver.resolve(scenario.customer)) is Stage.SHADOW
        await advance(builder, clock, end + 3_600)
        assert await item_price(builder, scenario) == scenario.meter_price
        resolver = engine.resolver
        assert isinstance(resolver, StageResolver)
        assert isinstance(resolver.test_clocks, StripeTestClocks)
        resolver.test_clocks.forget()  # the reading is kept 5 s: the test does not wait
        resolver.invalidate(scenario.customer)
        assert (await engine.resolver.resolve(scenario.customer)) is Stage.PRIMARY
        outcome = await engine.record(usage(scenario, 4, timestamp=end + 1_800))
        assert outcome.accepted, outcome

    async def test_flags_schedule_judges_at_by_the_clock(
        self, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """`flags schedule --at` a time behind the process clock but ahead of the customer's test
        clock is a future entry (accepted without --force); one behind the clock is refused."""
        frozen = standin.clock.now() - 60 * DAY
        scenario, _ = await clock_customer(builder, frozen)
        end = await scheduled(ops, scenario)
        await ops.store.clear_schedule(scenario.customer, actor="ann")
        await ops.store.set_override(scenario.customer, Stage.SHADOW, actor="ann")
        result = await schedule_stage(ops, scenario.customer, Stage.PRIMARY, end, actor="ann")
        assert [change.at for change in result.changes] == [end]
        with pytest.raises(CutoverInputError, match="in the past"):
            await schedule_stage(ops, scenario.customer, Stage.PRIMARY, frozen - DAY, actor="ann")

    async def test_a_customer_without_a_clock_keeps_the_process_clock(
        self, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """No test clock: no clock is read, and the schedule is judged by the process clock."""
        scenario = await builder.customer("plain")
        await scheduled(ops, scenario)
        assert (await ops.store.billing_of(scenario.customer)).test_clock is None
        assert (await ops.stage_of(scenario.customer))[0] is Stage.SHADOW
        assert ops.test_clocks.reads == 0


class TestMintedNow:
    """Usage sent without a timestamp ("now") for a customer on a test clock is fixed to the
    clock's frozen time, which Stripe judges it by; ``flags get`` resolves by the clock too."""

    async def test_now_is_the_clocks_frozen_time(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        engine: DualWriteEngine,
        standin: StripeStandin,
    ) -> None:
        """A clock 60 days behind: usage at "now" is written at the clock's time and accepted on
        both legs (the process clock's now is past the clock's period: Stripe refuses it), with
        one clock read for three requests."""
        frozen = standin.clock.now() - 60 * DAY
        scenario, _ = await clock_customer(builder, frozen)
        await scheduled(ops, scenario)  # records the clock; the customer stays at shadow
        resolver = engine.resolver
        assert isinstance(resolver, StageResolver)
        assert isinstance(resolver.test_clocks, StripeTestClocks)
        for quantity in (2, 3, 4):
            minted = usage(scenario, quantity).model_copy(
                update={"timestamp": engine.now(), "timestamp_source": "intercept"}
            )
            outcome = await engine.record(minted)
            assert outcome.accepted, (outcome.event, outcome.authoritative.failure)
            assert outcome.event.timestamp == frozen and outcome.stage is Stage.SHADOW
        assert resolver.test_clocks.reads == 1
        with anyio.fail_after(20):
            await engine.new_worker().drain()
        assert standin.legacy_total(scenario.item) == 9
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 9

    async def test_a_given_timestamp_is_kept(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        engine: DualWriteEngine,
        standin: StripeStandin,
    ) -> None:
        """A timestamp the caller gave is the caller's: never moved to the clock's time."""
        frozen = standin.clock.now() - 60 * DAY
        scenario, clock = await clock_customer(builder, frozen)
        await scheduled(ops, scenario)
        await advance(builder, clock, frozen + 3_600)
        outcome = await engine.record(usage(scenario, 2, timestamp=frozen + 60))
        assert outcome.accepted and outcome.event.timestamp == frozen + 60

    async def test_flags_get_resolves_by_the_clock(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        redis_url: str,
        key_prefix: str,
        standin_url: str,
        clean_environment: None,
    ) -> None:
        """A cutover due at a period end behind the process clock but ahead of the customer's
        test clock: `flags get` shows shadow (the stage the engine uses), and says which clock
        judged it."""
        frozen = standin.clock.now() - 90 * DAY
        scenario, clock = await clock_customer(builder, frozen)
        end = await scheduled(ops, scenario)
        assert end < standin.clock.now()
        env = cli_environment(redis_url, key_prefix, standin_url)
        runner = CliRunner()
        shown = await anyio.to_thread.run_sync(
            lambda: runner.invoke(app, ["flags", "get", scenario.customer, "--json"], env=env)
        )
        assert shown.exit_code == 0, shown.output
        (row,) = json.loads(shown.output)
        assert row["stage"] == "shadow", row
        assert clock in row["detail"] and "test clock" in row["detail"]


class TestKillSwitchHold:
    """The kill switch holds a customer whose item moved to the meter-backed price at primary."""

    async def test_moved_customer_stays_primary_under_the_kill_switch(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        engine: DualWriteEngine,
    ) -> None:
        """Past the price move, kill on: the customer resolves to primary (with the reason) and
        its usage is accepted; everyone else is legacy; the audit log records the price move."""
        frozen = standin.clock.now() - 60 * DAY
        scenario, clock = await clock_customer(builder, frozen)
        end = await scheduled(ops, scenario)
        await advance(builder, clock, end + 60)
        ops.test_clocks.forget()
        other = await builder.customer("other")
        await set_stage(engine, other.customer, Stage.SHADOW)
        await ops.kill(actor="oncall", reason="incident")
        snapshot = await ops.store.snapshot(scenario.customer)
        assert snapshot.kill
        assert (await ops.stage_of(scenario.customer))[0] is Stage.PRIMARY
        assert (await ops.stage_of(other.customer))[0] is Stage.LEGACY
        resolver = engine.resolver
        assert isinstance(resolver, StageResolver)
        resolver.invalidate()
        explained = await resolver.explain(scenario.customer)
        assert explained.stage is Stage.PRIMARY and "held at primary" in explained.detail
        outcome = await engine.record(usage(scenario, 2, timestamp=end + 120))
        assert outcome.accepted, outcome
        audit = await ops.store.history(customer=scenario.customer)
        assert any(entry.action == "set_billing" and entry.actor == "ann" for entry in audit)

    async def test_kill_before_the_move_releases_and_forgets_the_price_move(
        self, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """Kill on while the cutover is pending: its schedule is released and its price move
        forgotten, so past the period end the customer is legacy on the legacy price."""
        frozen = standin.clock.now() - 60 * DAY
        scenario, clock = await clock_customer(builder, frozen)
        end = await scheduled(ops, scenario)
        result = await ops.kill(actor="oncall", reason="incident")
        assert any("released Stripe schedule" in note for note in result.notes)
        assert (await ops.store.billing_of(scenario.customer)).price_move_at is None
        await advance(builder, clock, end + 60)
        ops.test_clocks.forget()
        assert await item_price(builder, scenario) == scenario.legacy_price
        assert (await ops.stage_of(scenario.customer))[0] is Stage.LEGACY
