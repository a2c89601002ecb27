"""Retired legacy writes: usage records Stripe refused because the item moved to its meter-backed
price. They are explained (never divergence) in the dead letters, the report, the guard and the
readiness verdict; every other legacy refusal stays divergence. Stripe's refusals come from the
stand-in's own error bodies, over HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.typing import EncodableT, FieldT
from typer.testing import CliRunner

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.cutover import CutoverOps
from dualwrite.deadletters import DeadLetters
from dualwrite.engine import DualWriteEngine
from dualwrite.health import HealthCheck
from dualwrite.metrics import OutboxSampler, metrics_app
from dualwrite.models import Stage
from dualwrite.outbox import Outbox
from dualwrite.report import CustomerReport, build_report
from dualwrite.testing import StripeStandin
from dualwrite.web._views import period_lines, summarise
from tests.conftest import SettingsFactory
from tests.support import (
    Scenario,
    ScenarioBuilder,
    cli_environment,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio

DAY = 86_400


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """UTC-day periods (closed a day later); guardrails sized for a handful of customers."""
    return standin_settings(
        ledger={"periods": "day"},
        guardrails={"max_divergent_events": 0, "min_customers": 3, "max_divergent_share_pct": 30},
    )


async def drain(engine: DualWriteEngine) -> None:
    """Deliver every shadow write (refusals dead-lettered)."""
    with anyio.fail_after(20):
        await engine.new_worker().drain()


async def cut_over(engine: DualWriteEngine, builder: ScenarioBuilder, name: str) -> Scenario:
    """A primary customer with one legacy shadow accepted, then its item moved to the meter
    price (as the cutover's schedule does) and two more events whose legacy shadows are retired."""
    scenario = await builder.customer(name)
    await set_stage(engine, scenario.customer, Stage.PRIMARY)
    assert (await engine.record(usage(scenario, 1))).accepted
    await drain(engine)
    await builder.move_to_meter_price(scenario)
    for quantity in (1, 1):
        assert (await engine.record(usage(scenario, quantity))).accepted
    await drain(engine)
    return scenario


async def line_of(
    engine: DualWriteEngine, customer: str, *, now: float | None = None
) -> CustomerReport:
    """The customer's report line."""
    report = await build_report(engine.ledger, engine.resolver, customer=customer, now=now)
    (line,) = report.customers
    return line


@dataclass(frozen=True)
class _Watched:
    """A process with no worker of its own, running (what health checks read)."""

    worker: None = None
    durability: None = None
    stopping: bool = False


async def dead_figures(engine: DualWriteEngine, settings: Settings) -> tuple[int, float, int]:
    """The dead count three ways: the outbox's depth, the ``/metrics`` gauge, health's body."""
    transport = httpx.ASGITransport(app=metrics_app(settings, engine=engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as client:
        text = (await client.get("/metrics")).text
    gauge = next(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dualwrite_outbox_entries" and sample.labels.get("state") == "dead"
    )
    check = HealthCheck(
        role="worker",
        watched=_Watched(),
        sampler=OutboxSampler(engine.outbox, engine.redis, engine.keys),
        worker_expected=False,
        key_needed=False,
        has_key=True,
    )
    _, health = await check.health()
    return (await engine.outbox.depth()).dead, gauge, health["outbox"]["dead"]


class TestClassification:
    """Only Stripe's "not on the legacy metered billing system" refusal makes a write retired."""

    async def test_item_moved_to_the_meter_price_is_retired(
        self, engine: DualWriteEngine, builder: ScenarioBuilder
    ) -> None:
        """The legacy shadow refused after the price move: retired, no divergence."""
        scenario = await cut_over(engine, builder, "moved")
        letters = await DeadLetters(engine.redis, engine.keys).find(reason="retired")
        assert len(letters) == 2 and all(letter.reason == "retired" for letter in letters)
        assert "not on the legacy metered billing system" in letters[0].error
        assert await engine.ledger.divergences(customer=scenario.customer) == []
        line = await line_of(engine, scenario.customer)
        assert (line.legacy.retired_qty, line.legacy.failed_qty, line.divergent_events) == (2, 0, 0)

    async def test_another_legacy_refusal_is_divergence(
        self, engine: DualWriteEngine, builder: ScenarioBuilder
    ) -> None:
        """A legacy shadow refused for its timestamp (item still legacy) is refused, divergent."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.PRIMARY)
        before_period = int(time.time()) - 3 * DAY  # the meter takes it, the usage record not
        assert (await engine.record(usage(scenario, 4, timestamp=before_period))).accepted
        await drain(engine)
        (letter,) = await DeadLetters(engine.redis, engine.keys).find(reason=None)
        assert letter.reason == "refused"
        assert "timestamps must be after" in letter.error
        (record,) = await engine.ledger.divergences(customer=scenario.customer)
        assert record.kind == "shadow_refused" and record.legacy.status == "refused"
        line = await line_of(engine, scenario.customer)
        assert (line.legacy.retired_qty, line.legacy.failed_qty) == (0, 4)
        assert line.status == "diverged"

    async def test_expired_write_is_never_retired(
        self, standin_settings: SettingsFactory, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """A legacy shadow that kept failing (503) until it expired is divergence, whatever the
        wording of its last error: it never reached Stripe's legacy system."""
        settings = standin_settings(outbox={"max_age_seconds": 0.2})
        async with DualWriteEngine.from_settings(settings) as engine:
            scenario = await builder.customer()
            await set_stage(engine, scenario.customer, Stage.PRIMARY)
            standin.faults.refuse(
                path=rf"/v1/subscription_items/{scenario.item}/usage_records",
                status=503,
                message=f"`{scenario.item}` is not on the legacy metered billing system (yet).",
            )
            assert (await engine.record(usage(scenario, 5))).accepted
            await drain(engine)
            (letter,) = await DeadLetters(engine.redis, engine.keys).find()
            assert letter.reason == "expired"
            (record,) = await engine.ledger.divergences(customer=scenario.customer)
            assert record.kind == "shadow_expired"


class TestReport:
    """The report counts retired legacy writes as explained, on the legacy side."""

    async def test_retired_writes_are_no_difference(
        self, engine: DualWriteEngine, builder: ScenarioBuilder
    ) -> None:
        """1 accepted + 2 retired legacy vs 3 meter: parity, difference 0 (was -66.67 %)."""
        scenario = await cut_over(engine, builder, "moved")
        line = await line_of(engine, scenario.customer)
        assert (line.legacy.accepted_qty, line.legacy.retired_qty, line.meter.accepted_qty) == (
            1,
            2,
            3,
        )
        assert line.status == "parity"
        assert line.difference == 0 and line.difference_pct == 0.0

    async def test_web_page_differences(
        self, engine: DualWriteEngine, builder: ScenarioBuilder
    ) -> None:
        """The HTML report's summary and per-period lines count retired writes the same way."""
        scenario = await cut_over(engine, builder, "moved")
        report = await build_report(engine.ledger, engine.resolver, customer=scenario.customer)
        assert summarise(report).difference == 0
        rows = await engine.ledger.rows(customer=scenario.customer)
        assert [line.difference for line in period_lines(rows)] == [0]


class TestGuard:
    """Neither guard rule fires on retired writes."""

    async def test_retired_customers_do_not_trip_the_guard(
        self,
        engine: DualWriteEngine,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        settings: Settings,
    ) -> None:
        """Three cut-over customers stay primary; only the planted divergence goes back."""
        moved = [await cut_over(engine, builder, f"moved{index}") for index in range(3)]
        planted = await builder.customer("planted")
        await set_stage(engine, planted.customer, Stage.SHADOW)
        standin.faults.refuse(
            path="/v1/billing/meter_events",
            where={"payload[stripe_customer_id]": planted.customer},
            code="parameter_invalid",
            message="Refused for the guard test.",
        )
        assert (await engine.record(usage(planted, 2))).accepted
        await drain(engine)
        ops = CutoverOps(engine.redis, engine.keys, settings)
        result = await ops.guard_once()
        assert result.checked == 4
        assert [trip.customer for trip in result.tripped] == [planted.customer]
        assert not result.global_tripped
        for scenario in moved:
            assert (await ops.stage_of(scenario.customer))[0] is Stage.PRIMARY
        assert (await ops.stage_of(planted.customer))[0] is Stage.LEGACY


class TestReadiness:
    """Retired shadows do not keep a cut-over customer from ``meter``."""

    async def test_cut_over_customer_becomes_ready_for_meter(
        self, engine: DualWriteEngine, builder: ScenarioBuilder
    ) -> None:
        """Once its period closed, the primary customer with retired shadows is ready."""
        scenario = await cut_over(engine, builder, "moved")
        line = await line_of(engine, scenario.customer, now=time.time() + 2 * DAY)
        assert line.verdict.next_stage is Stage.METER
        assert line.verdict.ready, line.verdict.reason
        assert "retired" in line.verdict.reason


class TestDeadLetters:
    """Retired writes are not failures: out of ``dead list`` by default, their own count."""

    async def test_retired_are_kept_apart(
        self, engine: DualWriteEngine, builder: ScenarioBuilder, standin: StripeStandin
    ) -> None:
        """find() leaves them out unless asked; counts() gives each reason its count."""
        await cut_over(engine, builder, "moved")
        planted = await builder.customer("planted")
        await set_stage(engine, planted.customer, Stage.SHADOW)
        standin.faults.refuse(path="/v1/billing/meter_events", code="parameter_invalid", count=1)
        assert (await engine.record(usage(planted, 2))).accepted
        await drain(engine)
        letters = DeadLetters(engine.redis, engine.keys)
        (shown,) = await letters.find()
        assert shown.reason == "refused"
        assert {letter.reason for letter in await letters.find(reason="retired")} == {"retired"}
        assert len(await letters.find(include_retired=True)) == 3
        assert await letters.counts() == {"refused": 1, "retired": 2}

    async def test_retired_are_not_counted_dead(
        self,
        engine: DualWriteEngine,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        settings: Settings,
    ) -> None:
        """Retired writes leave the outbox's dead count, the ``dead`` gauge and health's
        ``outbox.dead`` at 0; one real dead letter makes each 1."""
        await cut_over(engine, builder, "moved")
        assert await DeadLetters(engine.redis, engine.keys).counts() == {"retired": 2}
        assert await dead_figures(engine, settings) == (0, 0, 0)
        planted = await builder.customer("planted")
        await set_stage(engine, planted.customer, Stage.SHADOW)
        standin.faults.refuse(path="/v1/billing/meter_events", code="parameter_invalid", count=1)
        assert (await engine.record(usage(planted, 2))).accepted
        await drain(engine)
        assert await dead_figures(engine, settings) == (1, 1, 1)

    async def test_retired_letters_retry_and_drop(
        self, engine: DualWriteEngine, builder: ScenarioBuilder
    ) -> None:
        """A retired letter (in its own stream) is shown, retried back into the outbox with its
        retired count undone in the ledger, and dropped, by its id."""
        scenario = await cut_over(engine, builder, "moved")
        letters = DeadLetters(engine.redis, engine.keys)
        first, second = await letters.find(reason="retired")
        assert ":retired:" in first.id and (await letters.show(first.id)) == first
        assert [letter.id for letter in await letters.retry([first.id])] == [first.id]
        line = await line_of(engine, scenario.customer)
        assert line.legacy.retired_qty == 1 and (await engine.outbox.depth()).ready == 1
        await drain(engine)  # Stripe replays its refusal for the write's key: retired again
        assert await letters.counts() == {"retired": 2}
        (again,) = [letter for letter in await letters.find(reason="retired") if letter != second]
        assert ":retired:" in again.id and again.id != first.id
        await letters.drop([second.id, again.id])
        assert await letters.counts() == {}
        assert (await engine.outbox.depth()).dead == 0

    async def test_old_retired_letters_in_the_dead_stream(
        self, engine: DualWriteEngine, builder: ScenarioBuilder
    ) -> None:
        """A retired letter written to the dead stream before retired writes had their own stream
        is still left out of listings by default, counted as retired, and retried by its id."""
        await cut_over(engine, builder, "moved")
        letters = DeadLetters(engine.redis, engine.keys)
        first, _ = await letters.find(reason="retired")
        shard = engine.keys.shard(int(first.id.split(":")[0]))
        await letters.drop([first.id])
        old_id = await engine.redis.xadd(
            shard.dead,
            {
                "entry": first.raw,
                "reason": "retired",
                "code": first.code,
                "error": first.error,
                "at": f"{first.at:.3f}",
            },
        )
        assert await letters.find() == []
        assert await letters.counts() == {"retired": 2}
        (old,) = [
            letter
            for letter in await letters.find(reason="retired")
            if ":retired:" not in letter.id
        ]
        assert old.id == f"{shard.shard}:{old_id!s}" and old.reason == "retired"
        await letters.retry([old.id])
        assert await engine.redis.xlen(shard.dead) == 0
        assert await letters.counts() == {"retired": 1}

    async def test_old_retired_letters_move_to_their_stream(
        self, engine: DualWriteEngine, builder: ScenarioBuilder, settings: Settings
    ) -> None:
        """On a store an older version wrote (retired letters in the dead stream, no marker), the
        outbox's start moves them to the retired stream, once, leaving failures where they were:
        the dead count is then right too."""
        await cut_over(engine, builder, "moved")
        letters = DeadLetters(engine.redis, engine.keys)
        first, _ = await letters.find(reason="retired")
        shard = engine.keys.shard(int(first.id.split(":")[0]))
        await letters.drop([first.id])
        old: dict[FieldT, EncodableT] = {
            "entry": first.raw,
            "reason": "retired",
            "code": first.code,
            "at": f"{first.at:.3f}",
        }
        await engine.redis.xadd(shard.dead, old)
        await engine.redis.xadd(shard.dead, {"entry": "{}", "reason": "unreadable", "at": "1"})
        await engine.redis.delete(shard.retired_moved)  # as an older version left the store
        assert (await engine.outbox.depth()).dead == 2
        await Outbox(engine.redis, engine.keys, settings.outbox, engine.ledger).ensure_groups()
        assert await engine.redis.get(shard.retired_moved) == "done"
        assert (await engine.outbox.depth()).dead == 1
        assert await letters.counts() == {"retired": 2, "unreadable": 1}
        # Matched by entry: two letters of one cut-over can share a millisecond.
        found = await letters.find(reason="retired")
        moved = [letter for letter in found if letter.entry == first.entry]
        assert len(moved) == 1 and ":retired:" in moved[0].id and moved[0].at == first.at
        await engine.redis.xadd(shard.dead, old)  # done once: not scanned again
        await Outbox(engine.redis, engine.keys, settings.outbox, engine.ledger).ensure_groups()
        assert (await engine.outbox.depth()).dead == 2

    async def test_dead_list_command(
        self,
        engine: DualWriteEngine,
        builder: ScenarioBuilder,
        redis_url: str,
        key_prefix: str,
        standin_url: str,
        clean_environment: None,
    ) -> None:
        """`dead list` says how many retired writes it left out; --kind retired lists them."""
        scenario = await cut_over(engine, builder, "moved")
        env = cli_environment(redis_url, key_prefix, standin_url)
        runner = CliRunner()
        listed = await anyio.to_thread.run_sync(
            lambda: runner.invoke(app, ["dead", "list"], env=env)
        )
        assert listed.exit_code == 0, listed.output
        flat = " ".join(listed.output.split())
        assert scenario.customer not in flat
        assert "no dead letters" in flat and "2 retired" in flat and "--kind retired" in flat
        retired = await anyio.to_thread.run_sync(
            lambda: runner.invoke(app, ["dead", "list", "--kind", "retired"], env=env)
        )
        assert retired.exit_code == 0 and retired.output.count(scenario.customer) == 2
