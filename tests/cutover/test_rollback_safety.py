"""Rollbacks around a cutover's price move: none leaves a customer at a stage whose authoritative
leg Stripe refuses for its item, and none lets a pending cutover move a customer sent back. Stripe
is the stand-in over HTTP (its subscription schedules move the item's price on its own clock)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.routing import Mount
from typer.testing import CliRunner

from dualwrite.admin import admin_app
from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.cutover import CutoverInputError, CutoverOps
from dualwrite.engine import DualWriteEngine
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.support import (
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    cli_environment,
    cut_over_at_period_end,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio


class Clock:
    """The operations' clock, kept on the stand-in's (``sync``) or moved by hand."""

    def __init__(self, standin: StripeStandin) -> None:
        self.standin = standin
        self.now = float(standin.clock.now())

    def __call__(self) -> float:
        return self.now

    def to(self, when: int) -> None:
        """Move both clocks (the stand-in applies due schedule phases on its next call)."""
        self.standin.clock.set(when)
        self.now = float(when)


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """UTC-day ledger periods; guardrails sized for a handful of customers."""
    return standin_settings(
        ledger={"periods": "day"},
        guardrails={"max_divergent_events": 0, "min_customers": 2, "max_divergent_share_pct": 50},
    )


@pytest.fixture
def clock(standin: StripeStandin) -> Clock:
    """Starts at the stand-in's now."""
    return Clock(standin)


@pytest.fixture
async def ops(
    redis_client: aioredis.Redis, settings: Settings, clock: Clock
) -> AsyncIterator[CutoverOps]:
    """Cutover operations on this test's prefix, the stand-in and its clock."""
    yield CutoverOps(redis_client, KeySpace(settings.redis.key_prefix), settings, clock=clock)


async def scheduled_cutover(
    ops: CutoverOps, builder: ScenarioBuilder, name: str
) -> tuple[Scenario, int, str]:
    """A shadow customer cut over to primary at its period end with the Stripe schedule; returns
    it, the period end and the schedule's id."""
    scenario = await builder.customer(name)
    end, schedule = await cut_over_at_period_end(ops, scenario)
    return scenario, end, schedule


async def price_of(builder: ScenarioBuilder, scenario: Scenario) -> str:
    """The item's price now, as Stripe reports it."""
    item = await builder.client.v1.subscription_items.retrieve_async(scenario.item)
    return str(item["price"]["id"])


async def schedule_status(builder: ScenarioBuilder, schedule: str) -> str:
    """A subscription schedule's status, as Stripe reports it."""
    found = await builder.client.v1.subscription_schedules.retrieve_async(schedule)
    return str(found["status"])


class TestNamedRollback:
    """`rollback cus_…` before and after the price move."""

    async def test_before_the_price_move_the_schedule_is_released(
        self, ops: CutoverOps, builder: ScenarioBuilder, clock: Clock
    ) -> None:
        """A rollback while the cutover is pending releases its schedule (a dry run only lists
        the call): after the period end the item is still on the legacy price, the customer at
        legacy."""
        scenario, end, schedule = await scheduled_cutover(ops, builder, "pending")
        dry = await ops.rollback([scenario.customer], actor="oncall", dry_run=True)
        assert [call.path for call in dry.stripe_calls] == [
            f"/v1/subscription_schedules/{schedule}/release"
        ]
        assert await schedule_status(builder, schedule) == "active"
        result = await ops.rollback([scenario.customer], actor="oncall", reason="not yet")
        (release,) = result.stripe_calls
        assert release.result_id == schedule and release.method == "POST"
        assert any(f"released Stripe schedule {schedule}" in note for note in result.notes)
        assert await schedule_status(builder, schedule) == "released"
        clock.to(end + 60)
        assert await price_of(builder, scenario) == scenario.legacy_price
        assert (await ops.stage_of(scenario.customer))[0] is Stage.LEGACY

    async def test_after_the_price_move_the_customer_stays_at_primary(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        clock: Clock,
        engine: DualWriteEngine,
    ) -> None:
        """Once the item is on the meter price a rollback stops at primary, with --force too,
        saying why; the customer's usage is still accepted."""
        scenario, end, _ = await scheduled_cutover(ops, builder, "moved")
        clock.to(end + 60)
        assert await price_of(builder, scenario) == scenario.meter_price
        assert (await ops.stage_of(scenario.customer))[0] is Stage.PRIMARY
        result = await ops.rollback([scenario.customer], actor="oncall")
        assert result.held == {scenario.customer: Stage.PRIMARY}
        (note,) = result.notes
        assert "stays at primary, not shadow" in note and scenario.meter_price in note
        assert (await ops.stage_of(scenario.customer))[0] is Stage.PRIMARY
        forced = await ops.rollback(
            [scenario.customer], to=Stage.LEGACY, force=True, actor="oncall"
        )
        assert forced.held == {scenario.customer: Stage.PRIMARY}
        assert (await ops.stage_of(scenario.customer))[0] is Stage.PRIMARY
        outcome = await engine.record(usage(scenario, 3, timestamp=end + 30))
        assert outcome.accepted and outcome.stage is Stage.PRIMARY

    async def test_a_schedule_dualwrite_did_not_make_refuses_the_rollback(
        self, ops: CutoverOps, builder: ScenarioBuilder
    ) -> None:
        """Someone else's schedule moving the item later: refused, naming it; nothing changed."""
        scenario = await builder.customer()
        await ops.store.set_override(scenario.customer, Stage.PRIMARY, actor="t")
        theirs = await builder.client.v1.subscription_schedules.create_async(
            {"from_subscription": scenario.subscription}, {"stripe_version": LEGACY_VERSION}
        )
        phase = theirs["phases"][0]
        await builder.client.v1.subscription_schedules.update_async(
            theirs.id,
            {
                "phases": [
                    {
                        "start_date": phase["start_date"],
                        "end_date": phase["end_date"],
                        "items": [{"price": scenario.legacy_price}],
                    },
                    {"items": [{"price": scenario.meter_price}]},
                ]
            },
            {"stripe_version": LEGACY_VERSION},
        )
        before = await ops.store.snapshot(scenario.customer)
        with pytest.raises(
            CutoverInputError, match=rf"schedule {theirs.id} \(not made by dualwrite\)"
        ):
            await ops.rollback([scenario.customer], actor="oncall")
        assert await ops.store.snapshot(scenario.customer) == before
        assert await schedule_status(builder, theirs.id) == "active"

    async def test_without_a_stripe_key_a_rollback_below_primary_is_refused(
        self, standin_settings: SettingsFactory, redis_client: aioredis.Redis
    ) -> None:
        """Whether the item left the legacy price cannot be known: refused, the key named."""
        settings = standin_settings(STRIPE_API_KEY=None)
        ops = CutoverOps(redis_client, KeySpace(settings.redis.key_prefix), settings)
        await ops.store.set_override("cus_nokey", Stage.PRIMARY, actor="t")
        with pytest.raises(CutoverInputError, match="STRIPE_API_KEY is not set"):
            await ops.rollback(["cus_nokey"], actor="oncall")
        assert (await ops.stage_of("cus_nokey"))[0] is Stage.PRIMARY
        shadow = await ops.rollback(["cus_nokey"], to=Stage.PRIMARY, actor="oncall")
        assert shadow.unchanged == ["cus_nokey is already primary"]


class TestGlobalRollbacks:
    """`rollback --all`, the guard's global rollback and the kill switch cancel pending cutovers."""

    async def test_rollback_all_releases_pending_schedules_and_holds_moved_customers(
        self, ops: CutoverOps, builder: ScenarioBuilder, clock: Clock
    ) -> None:
        """The pending cutover's schedule is released; a customer whose price already moved stays
        at primary under --force to legacy."""
        moved, end, _ = await scheduled_cutover(ops, builder, "moved")
        clock.to(end + 60)
        pending, later, schedule = await scheduled_cutover(ops, builder, "pending")
        result = await ops.rollback_all(to=Stage.LEGACY, force=True, actor="oncall")
        assert result.held == {moved.customer: Stage.PRIMARY}
        assert [call.path for call in result.stripe_calls] == [
            f"/v1/subscription_schedules/{schedule}/release"
        ]
        clock.to(later + 60)
        assert await price_of(builder, pending) == pending.legacy_price
        assert (await ops.stage_of(pending.customer))[0] is Stage.LEGACY
        assert (await ops.stage_of(moved.customer))[0] is Stage.PRIMARY

    async def test_guard_global_rollback_steps_back_once_and_cancels_cutovers(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        engine: DualWriteEngine,
        clock: Clock,
    ) -> None:
        """Two diverging customers trip the global rule: every rollout moves back one stage
        (shadow takes primary's percentage), the pending cutover is cancelled with its schedule
        released, and at its period end the customer does not jump forward."""
        await ops.rollout(Stage.SHADOW, percent=100, actor="ann")
        await ops.rollout(Stage.PRIMARY, percent=40, actor="ann")
        pending, end, schedule = await scheduled_cutover(ops, builder, "pending")
        bad = [await builder.customer(f"bad{index}") for index in range(2)]
        for scenario in bad:
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            standin.faults.refuse(
                path="/v1/billing/meter_events",
                where={"payload[stripe_customer_id]": scenario.customer},
                code="parameter_invalid",
            )
            assert (await engine.record(usage(scenario, 2))).accepted
        with anyio.fail_after(20):
            await engine.new_worker().drain()
        result = await ops.guard_once()
        assert result.global_tripped
        assert await ops.store.get_rollout() == {
            Stage.SHADOW: 40.0,
            Stage.PRIMARY: 0.0,
            Stage.METER: 0.0,
        }
        assert await schedule_status(builder, schedule) == "released"
        assert (await ops.store.snapshot(pending.customer)).schedule == ()
        clock.to(end + 60)
        assert (await ops.stage_of(pending.customer))[0] is Stage.SHADOW
        assert await price_of(builder, pending) == pending.legacy_price

    async def test_kill_switch_cancels_pending_cutovers(
        self, ops: CutoverOps, builder: ScenarioBuilder, clock: Clock
    ) -> None:
        """Kill on: the cutover's schedule is released and its flag entry cleared, so when the
        switch goes off after the period end the customer is back at shadow on the legacy
        price, not moved past it."""
        pending, end, schedule = await scheduled_cutover(ops, builder, "pending")
        result = await ops.kill(actor="oncall", reason="incident")
        assert [change.kind for change in result.changes] == [
            "kill",
            "set_override",
            "clear_schedule",
        ]
        assert [call.result_id for call in result.stripe_calls] == [schedule]
        assert await schedule_status(builder, schedule) == "released"
        clock.to(end + 60)
        await ops.store.set_kill(False, actor="oncall")
        assert (await ops.stage_of(pending.customer))[0] is Stage.SHADOW
        assert await price_of(builder, pending) == pending.legacy_price

    async def test_kill_switch_keeps_a_cutover_stripe_would_not_release(
        self, ops: CutoverOps, builder: ScenarioBuilder, standin: StripeStandin, clock: Clock
    ) -> None:
        """Stripe refusing the release does not stop the kill switch; that customer keeps its
        pending cutover, so its stage and price still move together, and a note says so."""
        pending, end, schedule = await scheduled_cutover(ops, builder, "pending")
        standin.faults.refuse(path=rf"/v1/subscription_schedules/{schedule}/release", count=1)
        result = await ops.kill(actor="oncall", reason="incident")
        assert [change.kind for change in result.changes] == ["kill"]
        (note,) = result.notes
        assert f"{pending.customer} keeps its pending cutover" in note
        assert await ops.store.get_kill()
        clock.to(end + 60)
        await ops.store.set_kill(False, actor="oncall")
        assert (await ops.stage_of(pending.customer))[0] is Stage.PRIMARY
        assert await price_of(builder, pending) == pending.meter_price


async def moved_primary(engine: DualWriteEngine, builder: ScenarioBuilder, name: str) -> Scenario:
    """A primary customer (by override) whose item is already on the meter-backed price."""
    scenario = await builder.customer(name)
    await set_stage(engine, scenario.customer, Stage.PRIMARY)
    await builder.move_to_meter_price(scenario)
    return scenario


class TestGuardHold:
    """The guard never sends a customer whose item left the legacy price below primary."""

    async def test_diverging_moved_customer_is_held_at_primary(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        engine: DualWriteEngine,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A real divergence trips the guard, which holds the customer at primary, says why,
        and does not trip it again for the same divergence."""
        scenario = await moved_primary(engine, builder, "moved")
        standin.faults.refuse(
            path=rf"/v1/subscription_items/{scenario.item}/usage_records",
            code="parameter_invalid",
            message="Refused for the guard test.",
        )
        assert (await engine.record(usage(scenario, 3))).accepted
        with anyio.fail_after(20):
            await engine.new_worker().drain()
        with caplog.at_level(logging.WARNING, logger="dualwrite.guard"):
            result = await ops.guard_once()
        (trip,) = result.tripped
        assert (trip.stage, trip.rolled_back_to) == (Stage.PRIMARY, Stage.PRIMARY)
        assert "stays at primary" in trip.held
        assert (await ops.stage_of(scenario.customer))[0] is Stage.PRIMARY
        (record,) = [r for r in caplog.records if getattr(r, "event", "") == "dualwrite.guard.held"]
        assert record.__dict__["customer"] == scenario.customer
        assert (await ops.guard_once()).tripped == []
        assert (await engine.record(usage(scenario, 1))).accepted


def test_rollback_command_says_why_it_stops(
    redis_url: str,
    key_prefix: str,
    standin_url: str,
    standin: StripeStandin,
    settings: Settings,
    clean_environment: None,
) -> None:
    """`dualwrite rollback` prints the hold and its reason; the customer stays primary."""

    async def setup() -> Scenario:
        async with (
            DualWriteEngine.from_settings(settings) as engine,
            ScenarioBuilder(standin_url, STRIPE_KEY) as builder,
        ):
            return await moved_primary(engine, builder, "moved")

    scenario = anyio.run(setup)
    env = cli_environment(redis_url, key_prefix, standin_url)
    result = CliRunner().invoke(app, ["rollback", scenario.customer], env=env)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert f"note: {scenario.customer} stays at primary, not shadow" in flat
    shown = CliRunner().invoke(app, ["flags", "get", scenario.customer], env=env)
    assert "primary" in shown.output


class TestKillSwitchFrontDoors:
    """`dualwrite flags kill on` and the admin API's kill switch cancel pending cutovers too."""

    async def test_cli_kill_releases_the_pending_schedule(
        self,
        ops: CutoverOps,
        builder: ScenarioBuilder,
        redis_url: str,
        key_prefix: str,
        standin_url: str,
        clean_environment: None,
    ) -> None:
        """The command says what it cancelled; the schedule is released, the entry cleared."""
        pending, _, schedule = await scheduled_cutover(ops, builder, "pending")
        env = cli_environment(redis_url, key_prefix, standin_url)
        result = await anyio.to_thread.run_sync(
            lambda: CliRunner().invoke(
                app, ["flags", "kill", "on", "--reason", "incident"], env=env
            )
        )
        assert result.exit_code == 0, result.output
        flat = " ".join(result.output.split())
        assert f"released Stripe schedule {schedule}" in flat and "kill switch: ON" in flat
        assert await schedule_status(builder, schedule) == "released"
        assert (await ops.store.snapshot(pending.customer)).schedule == ()

    async def test_admin_kill_releases_the_pending_schedule(
        self, ops: CutoverOps, builder: ScenarioBuilder, settings: Settings
    ) -> None:
        """PUT /flags/kill {"on": true} cancels the cutover as the CLI does."""
        pending, _, schedule = await scheduled_cutover(ops, builder, "pending")
        token = "admin-token-for-tests-0123456789"
        api = admin_app(settings.model_copy(update={"admin_token": SecretStr(token)}))
        transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/admin", api)]))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
            response = await http.put(
                "/admin/flags/kill",
                json={"on": True, "reason": "incident"},
                headers={"Authorization": f"Bearer {token}"},
            )
        await api.aclose()
        assert response.status_code == 200 and response.json()["on"] is True
        assert await schedule_status(builder, schedule) == "released"
        assert (await ops.store.snapshot(pending.customer)).schedule == ()
