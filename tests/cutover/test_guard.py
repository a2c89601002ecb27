"""The guard: divergence over the guardrails rolls customers (or the rollout) back, audited."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import anyio
import pytest
import redis.asyncio as aioredis

from dualwrite.config import Settings
from dualwrite.cutover import GUARD_ACTOR, CutoverOps
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import ConfigError
from dualwrite.ledger import LedgerUpdate
from dualwrite.models import Leg, Stage, UsageEvent
from dualwrite.outbox import OutboxWorker
from dualwrite.testing import StripeStandin
from dualwrite.worker import run_worker
from tests.conftest import SettingsFactory
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, set_stage, usage

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """Guardrails tight enough for a handful of customers; the guard checks often."""
    return standin_settings(
        guardrails={
            "max_divergent_events": 0,
            "min_customers": 3,
            "max_divergent_share_pct": 50,
            "interval_seconds": 0.05,
        },
    )


@pytest.fixture
def ops(engine: DualWriteEngine, settings: Settings) -> CutoverOps:
    """Cutover operations on the engine's Redis."""
    return CutoverOps(engine.redis, engine.keys, settings)


def refuse_meter_events(standin: StripeStandin, scenario: Scenario) -> None:
    """Stripe refuses, for good, every meter event of this customer (a shadow write dies)."""
    standin.faults.refuse(
        path="/v1/billing/meter_events",
        where={"payload[stripe_customer_id]": scenario.customer},
        code="parameter_invalid",
        message="Refused for the guard test.",
    )


async def record_and_deliver(engine: DualWriteEngine, *scenarios: Scenario) -> None:
    """Two usage events per customer, shadow writes delivered (refusals dead-lettered)."""
    for scenario in scenarios:
        for quantity in (3, 4):
            outcome = await engine.record(usage(scenario, quantity))
            assert outcome.accepted
    with anyio.fail_after(20):
        await OutboxWorker(engine.outbox, engine.writer).drain()


async def test_planted_divergence_trips_the_guard(
    engine: DualWriteEngine,
    builder: ScenarioBuilder,
    standin: StripeStandin,
    ops: CutoverOps,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A shadow customer whose meter events Stripe refuses goes back to legacy; others stay."""
    bad, good = await builder.customer("bad"), await builder.customer("good")
    for scenario in (bad, good):
        await set_stage(engine, scenario.customer, Stage.SHADOW)
    refuse_meter_events(standin, bad)
    await record_and_deliver(engine, bad, good)

    dry = await ops.guard_once(dry_run=True)
    assert [trip.customer for trip in dry.tripped] == [bad.customer]
    assert (await ops.stage_of(bad.customer))[0] is Stage.SHADOW

    with caplog.at_level(logging.WARNING, logger="dualwrite.guard"):
        result = await ops.guard_once()
    assert result.checked == 2 and not result.global_tripped
    (trip,) = result.tripped
    assert (trip.customer, trip.stage, trip.rolled_back_to) == (
        bad.customer,
        Stage.SHADOW,
        Stage.LEGACY,
    )
    assert trip.divergent_events == 2
    assert (await ops.stage_of(bad.customer))[0] is Stage.LEGACY
    assert (await ops.stage_of(good.customer))[0] is Stage.SHADOW
    (entry,) = [e for e in await ops.store.history(customer=bad.customer) if e.actor == GUARD_ACTOR]
    assert entry.new == "legacy" and "2 divergent events > 0" in entry.reason
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "dualwrite.guard.tripped"]
    assert record.__dict__["customer"] == bad.customer
    assert record.__dict__["to_stage"] == "legacy"
    again = await ops.guard_once()  # nothing was written since: no customer to judge
    assert again.tripped == [] and again.checked == 0 and not again.full


async def test_rolled_back_customer_is_not_stepped_back_again(
    engine: DualWriteEngine, builder: ScenarioBuilder, standin: StripeStandin, ops: CutoverOps
) -> None:
    """primary → shadow once; the same old divergence does not push it on to legacy."""
    scenario = await builder.customer()
    await set_stage(engine, scenario.customer, Stage.PRIMARY)
    standin.faults.refuse(
        path=f"/v1/subscription_items/{scenario.item}/usage_records",
        code="parameter_invalid",
        message="Refused for the guard test.",
    )
    await record_and_deliver(engine, scenario)
    first = await ops.guard_once()
    assert [t.rolled_back_to for t in first.tripped] == [Stage.SHADOW]
    second = await ops.guard_once()
    assert second.tripped == []
    assert (await ops.stage_of(scenario.customer))[0] is Stage.SHADOW


async def test_share_of_divergent_customers_rolls_back_the_rollout(
    engine: DualWriteEngine, builder: ScenarioBuilder, standin: StripeStandin, ops: CutoverOps
) -> None:
    """Over the global share, every percentage rollout goes to 0 (audited as the guard)."""
    customers = [await builder.customer(f"c{index}") for index in range(3)]
    await ops.rollout(Stage.SHADOW, percent=100, actor="ann")
    for scenario in customers[:2]:
        refuse_meter_events(standin, scenario)
    await record_and_deliver(engine, *customers)
    result = await ops.guard_once()
    assert result.global_tripped and result.divergent_share_pct == pytest.approx(66.67)
    assert (await ops.store.get_rollout())[Stage.SHADOW] == 0
    assert (await ops.stage_of(customers[2].customer))[0] is Stage.LEGACY
    (entry,) = await ops.store.history(customer="*", limit=1)
    assert entry.actor == GUARD_ACTOR and "2 of 3 customers diverged" in entry.reason


async def test_guard_runs_inside_the_worker(
    engine: DualWriteEngine,
    builder: ScenarioBuilder,
    standin: StripeStandin,
    ops: CutoverOps,
    settings: Settings,
) -> None:
    """`dualwrite worker` delivers the shadow writes and its guard rolls the customer back."""
    scenario = await builder.customer()
    await set_stage(engine, scenario.customer, Stage.SHADOW)
    refuse_meter_events(standin, scenario)
    assert (await engine.record(usage(scenario, 2))).accepted
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop=stop))
    try:
        with anyio.fail_after(10):
            while True:
                if (await ops.stage_of(scenario.customer))[0] is Stage.LEGACY:
                    break
                await anyio.sleep(0.05)
    finally:
        stop.set()
        await task
    history = await ops.store.history(customer=scenario.customer)
    assert history[0].actor == GUARD_ACTOR


def test_guardrail_settings_are_validated(redis_url: str, key_prefix: str) -> None:
    """A share over 100 % is refused with the key named."""
    with pytest.raises(ConfigError, match=r"guardrails\.max_divergent_share_pct"):
        Settings.load(
            redis={"url": redis_url, "key_prefix": key_prefix},
            guardrails={"max_divergent_share_pct": 150},
        )


class RecordingConnection(aioredis.Connection):
    """A Redis connection keeping every command it sends (as the bytes on the wire)."""

    sent: ClassVar[list[bytes]] = []

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Keep, then send."""
        parts = command if isinstance(command, list) else [command]
        RecordingConnection.sent.append(b"".join(bytes(part) for part in parts))
        await super().send_packed_command(command, check_health)


@pytest.fixture
async def recorded_ops(
    redis_url: str, engine: DualWriteEngine, settings: Settings
) -> AsyncIterator[CutoverOps]:
    """Cutover operations on a Redis client of their own, whose commands are recorded."""
    client = aioredis.Redis.from_url(
        redis_url, decode_responses=True, connection_class=RecordingConnection
    )
    yield CutoverOps(client, engine.keys, settings)
    await client.aclose()


async def write_agreeing_rows(engine: DualWriteEngine, count: int) -> list[str]:
    """``count`` customers at ``shadow`` whose legs agree, written by the ledger's own script."""
    names = [f"cus_quiet{index:05d}" for index in range(count)]
    pipe = engine.redis.pipeline(transaction=False)
    for name in names:
        event = UsageEvent(
            identifier=f"quiet-{name}",
            customer=name,
            event_name=EVENT_NAME,
            quantity=5,
            timestamp=int(time.time()),
        )
        update = LedgerUpdate(engine.keys.for_customer(name), event)
        update.recorded(Stage.SHADOW, Leg.LEGACY, Leg.METER, 5, translated=False)
        update.shadow_accepted(Leg.METER, 5).queue(pipe)
    await pipe.execute()
    return names


async def test_a_pass_reads_only_the_customers_that_changed(
    engine: DualWriteEngine,
    builder: ScenarioBuilder,
    standin: StripeStandin,
    recorded_ops: CutoverOps,
) -> None:
    """After a full pass over 300 quiet customers, the next pass judges only the two whose rows
    changed: no command it sends names a quiet customer or reads a whole rollup or ledger index,
    and the diverging one of the two is still rolled back."""
    ops = recorded_ops
    await ops.rollout(Stage.SHADOW, percent=100, actor="ann")
    quiet = await write_agreeing_rows(engine, 300)
    bad, good = await builder.customer("bad"), await builder.customer("good")
    await record_and_deliver(engine, good)
    first = await ops.guard_once()
    assert first.full and first.checked == 301 and first.tripped == []

    refuse_meter_events(standin, bad)
    await record_and_deliver(engine, bad, good)
    RecordingConnection.sent = []
    result = await ops.guard_once()
    assert not result.full and result.checked == 2
    assert [trip.customer for trip in result.tripped] == [bad.customer]
    assert (await ops.stage_of(bad.customer))[0] is Stage.LEGACY
    sent = b"\n".join(RecordingConnection.sent)
    assert bad.customer.encode() in sent and good.customer.encode() in sent
    assert not [name for name in quiet if name.encode() in sent], [
        c[:300] for c in RecordingConnection.sent if b"cus_quiet" in c
    ]
    for whole_read in (b"HGETALL", b"HSCAN", b"ZRANGE"):
        assert not [
            command
            for command in RecordingConnection.sent
            if whole_read in command and (b":rollup:" in command or b"ledger-index" in command)
        ]
    # Constant in the number of customers: a few commands per shard, a few per changed customer.
    assert len(RecordingConnection.sent) < 3 * engine.keys.shards + 30

    again = await ops.guard_once()
    assert not again.full and again.checked == 0  # taken, judged and cleared


async def test_a_failed_pass_leaves_its_customers_to_the_next(
    engine: DualWriteEngine, builder: ScenarioBuilder, standin: StripeStandin, ops: CutoverOps
) -> None:
    """A dry pass (as a failed one) takes the changed customers without clearing them: the next
    pass judges them again. A flags change makes the next pass a full one."""
    bad = await builder.customer("bad")
    await ops.rollout(Stage.SHADOW, percent=100, actor="ann")
    assert (await ops.guard_once()).full  # the first pass
    refuse_meter_events(standin, bad)
    await record_and_deliver(engine, bad)
    dry = await ops.guard_once(dry_run=True)
    assert not dry.full and [trip.customer for trip in dry.tripped] == [bad.customer]
    real = await ops.guard_once()
    assert not real.full and [trip.customer for trip in real.tripped] == [bad.customer]
    await ops.rollout(Stage.PRIMARY, percent=10, actor="ann")
    assert (await ops.guard_once()).full
