"""Delivery under staged faults: each test ends with Stripe's summaries (both legs, read through the
stand-in's summary endpoints) and the ledger holding exactly what callers were told, per customer,
billing period and leg, as the oracle (``tests/oracle.py``) works it out from the stages the test
set: nothing lost, nothing counted twice.

Every test records through ``engine.record()``, with customers at ``shadow`` and at ``primary``
(legacy as the shadow). ``TestTrafficThroughTheEngine`` (not slow) also has ``legacy`` and ``meter``
customers, ``set`` usage, a ``last`` meter beside a ``last_during_period`` price and a billing
period that ends mid-traffic. The slow tests record thousands with the worker off, then deliver the
shadows under a fault; set DUALWRITE_FAULT_EVENTS to change how many (default 10,000).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from dualwrite.config import MeterMapping, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import ConflictError
from dualwrite.models import Action, Stage, UsageEvent
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.oracle import Aggregation, Oracle, ShadowFate
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    make_settings,
    record_as_caller,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio

EVENTS = int(os.environ.get("DUALWRITE_FAULT_EVENTS", "10000"))
CUSTOMERS = 40


@pytest.fixture
async def scenarios(builder: ScenarioBuilder) -> list[Scenario]:
    """Customers subscribed to the legacy price, each with a meter to shadow onto."""
    return [await builder.customer(f"Fault {index}") for index in range(CUSTOMERS)]


def fault_settings(
    redis_url: str, prefix: str, api_base: str, **outbox: float | int | str
) -> Settings:
    """Settings for delivery at volume: no rate limits, wide concurrency, quick retries."""
    return make_settings(
        redis_url=redis_url,
        prefix=prefix,
        api_base=api_base,
        api_key=STRIPE_KEY,
        stripe={"timeout": 0.5},
        limits={"legacy_per_second": 0, "meter_per_second": 0, "turn_lease_seconds": 5},
        outbox={"concurrency": 64, "batch_size": 200, "claim_idle_seconds": 1.0, **outbox},
    )


async def seed(engine: DualWriteEngine, scenarios: list[Scenario], count: int) -> Oracle:
    """``count`` usage events recorded through ``engine.record()`` (the worker off, so every shadow
    waits in the outbox), half the customers at shadow and half at primary (legacy as the shadow);
    returns the oracle that heard what each caller was told."""
    oracle = Oracle()
    for index, scenario in enumerate(scenarios):
        stage = (Stage.SHADOW, Stage.PRIMARY)[index % 2]
        await set_stage(engine, scenario.customer, stage)
        oracle.set_stage(scenario, stage)
    rng = random.Random(count)
    gate = anyio.Semaphore(32)

    async def send(index: int, scenario: Scenario, quantity: int) -> None:
        async with gate:
            event = usage(scenario, quantity, identifier=f"fault-{index}")
            await record_as_caller(engine, event)
            oracle.tell(scenario, quantity, timestamp=event.timestamp, accepted=True)

    async with anyio.create_task_group() as group:
        for index in range(count):
            group.start_soon(send, index, rng.choice(scenarios), rng.randint(1, 50))
    return oracle


async def assert_exact(engine: DualWriteEngine, builder: ScenarioBuilder, oracle: Oracle) -> None:
    """Stripe's summaries (both legs) and the ledger hold exactly what callers were told; the
    outbox is empty and nothing went dead."""
    await oracle.assert_stripe(builder.client)
    await oracle.assert_ledger(engine.ledger)
    depth = await engine.outbox.depth()
    assert depth.outstanding == 0 and depth.dead == 0


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str) -> Settings:
    """Delivery at volume (the shared ``engine`` fixture uses these)."""
    return fault_settings(redis_url, key_prefix, standin_url)


def worker_process(
    redis_url: str, prefix: str, api_base: str, log: Path
) -> subprocess.Popen[bytes]:
    """`python -m dualwrite worker`, configured through the environment as a user would."""
    env = {
        **os.environ,
        "STRIPE_API_KEY": STRIPE_KEY,
        "DUALWRITE_REDIS__URL": redis_url,
        "DUALWRITE_REDIS__KEY_PREFIX": prefix,
        "DUALWRITE_STRIPE__API_BASE": api_base,
        "DUALWRITE_STRIPE__TIMEOUT": "0.5",
        "DUALWRITE_LIMITS__METER_PER_SECOND": "0",
        "DUALWRITE_LIMITS__TURN_LEASE_SECONDS": "5",
        "DUALWRITE_OUTBOX__CONCURRENCY": "64",
        "DUALWRITE_OUTBOX__CLAIM_IDLE_SECONDS": "1",
        "DUALWRITE_OUTBOX__BACKOFF_BASE": "0.01",
        "DUALWRITE_OUTBOX__BACKOFF_MAX": "0.1",
        "DUALWRITE_OUTBOX__BLOCK_MS": "50",
    }
    with log.open("ab") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "dualwrite", "worker"], env=env, stdout=handle, stderr=handle
        )


@dataclass(frozen=True)
class FixedStages:
    """The engine's stage source: the stages the test set, which no Redis outage can change."""

    stages: dict[str, Stage]

    async def resolve(self, customer: str) -> Stage:
        """The stage the test set for ``customer``."""
        return self.stages[customer]


SEATS = "seats"
"""The event name of the ``last`` meter (beside a legacy ``last_during_period`` price)."""
TRAFFIC_EVENTS = 400
REFUSED_QTY = 99
"""The refused customer's legacy shadow writes of this quantity are refused for good."""


@dataclass(frozen=True)
class Caller:
    """One customer of the traffic: its stage, how Stripe aggregates it, and what it sends."""

    scenario: Scenario
    stage: Stage
    aggregation: Aggregation = "sum"
    action: Action = "increment"
    event_name: str = EVENT_NAME


async def seats_price(builder: ScenarioBuilder) -> tuple[str, str]:
    """A ``last`` meter for ``SEATS`` and a legacy ``last_during_period`` price: ``(meter,
    price)``."""
    meter = await builder.client.v1.billing.meters.create_async(
        {"display_name": "Seats", "event_name": SEATS, "default_aggregation": {"formula": "last"}}
    )
    product = await builder.client.v1.products.create_async({"name": "Seats"})
    params = {
        "currency": "usd",
        "product": product.id,
        "unit_amount": 1,
        "recurring": {
            "interval": "month",
            "usage_type": "metered",
            "aggregate_usage": "last_during_period",
        },
    }
    # aggregate_usage is gone from the SDK's typed params (removed in basil).
    price = await builder.client.v1.prices.create_async(
        cast(Any, params), {"stripe_version": LEGACY_VERSION}
    )
    return meter.id, price.id


async def traffic_callers(builder: ScenarioBuilder, *, now: int) -> list[Caller]:
    """Every stage; increments and sets on ``sum``; a ``last`` customer at shadow and at primary.
    Customers sending past timestamps are anchored an hour back (their period holds them)."""
    hour_ago = now - 3600
    seats_meter, seats = await seats_price(builder)
    callers = [
        Caller(await builder.customer(f"Traffic {stage.value}"), stage)
        for stage in (Stage.SHADOW, Stage.SHADOW, Stage.PRIMARY, Stage.LEGACY, Stage.METER)
    ]
    callers.append(Caller(await builder.customer("Refused"), Stage.PRIMARY))
    for stage in (Stage.SHADOW, Stage.PRIMARY):
        sets = await builder.customer(f"Sets {stage.value}", anchor=hour_ago)
        callers.append(Caller(sets, stage, action="set"))
        last = await builder.subscribe(
            f"Seats {stage.value}", seats, anchor=hour_ago, meter=seats_meter
        )
        callers.append(Caller(last, stage, aggregation="last", event_name=SEATS))
    return callers


class TestTrafficThroughTheEngine:
    """Callers record through the engine at every stage while Stripe fails a share of the calls on
    both paths; Stripe and the ledger end holding exactly what callers were told."""

    async def test_flaky_stripe_at_every_stage(
        self, standin_settings: SettingsFactory, builder: ScenarioBuilder, standin
    ):
        """400 events over twelve customers (shadow, primary with legacy as the shadow, legacy,
        meter; ``set`` and ``last`` usage; a billing period ending mid-traffic), 10 % of Stripe's
        usage calls failing (500, 429, lost replies), some legacy shadows refused for good."""
        settings = standin_settings(
            stripe={"timeout": 0.3, "request_retry_wait": 0.01},
            limits={"legacy_per_second": 0, "meter_per_second": 0},
            outbox={"concurrency": 16},
            meters=(MeterMapping(event_name=EVENT_NAME), MeterMapping(event_name=SEATS)),
        )
        now = int(time.time())
        callers = await traffic_callers(builder, now=now)
        refused = callers[5].scenario
        oracle = Oracle()
        rng = random.Random(TRAFFIC_EVENTS)
        # Past timestamps: a few per ``set`` customer (each set there replaces the last), distinct
        # and shuffled per ``last`` customer (the latest by timestamp is not the latest sent).
        set_stamps = [now - 300 + offset for offset in range(4)]
        last_stamps = {
            c.scenario.customer: rng.sample(range(now - 900, now - 400), 200)
            for c in callers
            if c.aggregation == "last"
        }
        async with DualWriteEngine.from_settings(settings) as engine:
            for caller in callers:
                await set_stage(engine, caller.scenario.customer, caller.stage)
                oracle.set_stage(caller.scenario, caller.stage, aggregation=caller.aggregation)
            standin.faults.refuse(
                path=rf"/v1/subscription_items/{refused.item}/usage_records",
                where={"quantity": str(REFUSED_QTY)},
                status=400,
                code="parameter_invalid",
                message="refused by the test",
            )
            standin.faults.configure(
                rate=0.1,
                kinds=("500", "429", "timeout"),
                paths=("/v1/billing/meter_events", "/v1/subscription_items/si_"),
                seed=3,
                timeout_seconds=0.5,
            )
            # At shadow: its legacy writes are made at intercept, inside the period they name (a
            # primary customer's legacy shadow of a closed period is refused by Stripe, as it
            # would be: "timestamps must be after the subscription's last invoice period").
            boundary = int(time.time()) + 3
            crossing = await builder.customer("Period ends mid-traffic", anchor=boundary)
            await set_stage(engine, crossing.customer, Stage.SHADOW)
            oracle.set_stage(crossing, Stage.SHADOW)
            callers.append(Caller(crossing, Stage.SHADOW))
            for index in range(TRAFFIC_EVENTS):
                if index == TRAFFIC_EVENTS // 2:
                    # The rest falls in the crossing customer's next billing period.
                    await anyio.sleep(max(0.0, boundary + 1 - time.time()))
                caller = callers[-1] if index < 3 else rng.choice(callers)
                scenario = caller.scenario
                quantity = rng.randint(1, 30)
                if scenario is refused and index % 4 == 0:
                    quantity = REFUSED_QTY
                if caller.action == "set":
                    timestamp = rng.choice(set_stamps)
                elif caller.aggregation == "last":
                    timestamp = last_stamps[scenario.customer].pop()
                else:
                    timestamp = int(time.time())
                event = UsageEvent(
                    identifier=f"traffic-{index}",
                    identifier_source="idempotency_key",
                    customer=scenario.customer,
                    subscription_item=scenario.item,
                    event_name=caller.event_name,
                    quantity=quantity,
                    timestamp=timestamp,
                    action=caller.action,
                )
                for _ in range(20):  # a caller retrying with its Idempotency-Key
                    outcome = await engine.record(event)
                    failure = outcome.authoritative.failure
                    if outcome.accepted or failure is None or not failure.retryable:
                        break
                fate: ShadowFate = "refused" if quantity == REFUSED_QTY else "accepted"
                oracle.tell(
                    scenario,
                    quantity,
                    timestamp=timestamp,
                    accepted=outcome.accepted,
                    shadow=fate,
                    action=caller.action,
                )
            with anyio.fail_after(60):
                await engine.new_worker(consumer="traffic").drain()
            standin.faults.clear()
            assert sum(standin.faults.injected.values()) > TRAFFIC_EVENTS // 20
            # Every caller got through, but for a write stamped before the boundary that reached
            # Stripe after it: refused, as Stripe refuses it.
            assert all(told.accepted for told in oracle.told if told.scenario is not crossing)
            crossed = [
                t.timestamp >= boundary
                for t in oracle.told
                if t.scenario is crossing and t.accepted
            ]
            assert any(crossed) and not all(crossed), "usage on both sides of the period's end"
            await oracle.assert_stripe(builder.client)
            await oracle.assert_ledger(engine.ledger)
            refusals = sum(1 for told in oracle.told if told.shadow == "refused")
            assert refusals > 0 and (await engine.outbox.depth()).dead == refusals


@pytest.mark.slow
class TestKilledWorker:
    """A worker killed with SIGKILL mid-batch loses and doubles nothing."""

    async def test_sigkill_mid_batch(
        self, engine, scenarios, builder, redis_url, key_prefix, standin_url, tmp_path
    ):
        """Kill the first worker after a quarter of the shadows; a second one finishes the job."""
        oracle = await seed(engine, scenarios, EVENTS)
        log = tmp_path / "workers.log"
        first = worker_process(redis_url, key_prefix, standin_url, log)
        try:
            with anyio.fail_after(60):
                while (await engine.outbox.depth()).outstanding > EVENTS * 3 // 4:
                    assert first.poll() is None, log.read_text()
                    await anyio.sleep(0.02)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert (await engine.outbox.depth()).outstanding > 0, "the kill came too late to test"
        second = worker_process(redis_url, key_prefix, standin_url, log)
        try:
            with anyio.fail_after(120):
                while (await engine.outbox.depth()).outstanding:
                    assert second.poll() is None, log.read_text()
                    await anyio.sleep(0.1)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0, log.read_text()
        await assert_exact(engine, builder, oracle)


@pytest.mark.slow
class TestFlakyStripe:
    """Stripe failing 30 % of calls (5xx, 429, timeouts) delays delivery, never changes it."""

    async def test_thirty_percent_failures(self, engine, scenarios, builder, standin):
        """Every fault kind, including timeouts whose write was applied, on both shadow legs,
        ends exact."""
        oracle = await seed(engine, scenarios, EVENTS)
        standin.faults.configure(
            rate=0.3,
            kinds=("500", "503", "429", "timeout"),
            paths=("/v1/billing/meter_events", "/v1/subscription_items/si_"),
            seed=11,
            timeout_seconds=0.8,
        )
        worker = engine.new_worker(consumer="flaky")
        with anyio.fail_after(180):
            await worker.drain()
        standin.faults.clear()
        assert worker.counts["retry"] > EVENTS // 10
        assert sum(standin.faults.injected.values()) > EVENTS // 10
        await assert_exact(engine, builder, oracle)


@pytest.mark.slow
class TestDuplicates:
    """Entries delivered twice (a slow worker and the worker that claimed its entries) count once."""

    async def test_every_entry_delivered_twice(self, engine, scenarios, builder):
        """Two workers deliver the same thousands of entries: Stripe and the ledger count each once."""
        oracle = await seed(engine, scenarios, EVENTS)
        await engine.outbox.ensure_groups()
        taken = await engine.outbox.read("slow", count=EVENTS, block_ms=None)
        assert len(taken) == EVENTS
        slow = engine.new_worker(consumer="slow")
        fast = engine.new_worker(consumer="fast")  # claims the slow one's entries after 1 s idle
        gate = anyio.Semaphore(64)
        late: Counter[str] = Counter()

        async def deliver_late(shard, entry_id: str, payload: str) -> None:
            async with gate:
                late[await slow.deliver(shard, entry_id, payload)] += 1

        async def slow_worker() -> None:
            await anyio.sleep(1.2)  # idle long enough for the fast worker to claim everything
            async with anyio.create_task_group() as group:
                for item in taken:
                    group.start_soon(deliver_late, *item)

        with anyio.fail_after(180):
            async with anyio.create_task_group() as group:
                group.start_soon(slow_worker)
                group.start_soon(fast.drain)
        assert late["accepted"] + fast.counts["accepted"] == EVENTS
        assert late["skipped"] + fast.counts["skipped"] > 0, "no entry was delivered twice"
        await assert_exact(engine, builder, oracle)


@pytest.mark.slow
class TestStream:
    """The v2 meter event stream: batches of 100, sessions renewed, faults survived."""

    async def test_thirty_percent_failures_and_expiring_sessions(
        self, redis_url, key_prefix, standin_url, scenarios, builder, standin
    ):
        """Faults on the stream and every session expired mid-run still end exact."""
        settings = fault_settings(redis_url, key_prefix, standin_url, batch_size=1000).model_copy(
            update={
                "stripe": fault_settings(redis_url, key_prefix, standin_url).stripe.model_copy(
                    update={"meter_path": "v2"}
                )
            }
        )
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        try:
            oracle = await seed(engine, scenarios, EVENTS)
            # Primary customers' meter events went out as they were recorded; count the shadows.
            before = len(standin.meter_events())
            shadows = sum(1 for told in oracle.told if told.stage is Stage.SHADOW)
            standin.faults.configure(
                rate=0.3,
                kinds=("500", "429", "timeout"),
                paths=("/v2/",),
                seed=5,
                timeout_seconds=0.8,
            )
            worker = engine.new_worker(consumer="streamer")

            async def expire_sessions() -> None:
                for quarter in (1, 2):  # mid-run, whatever the machine's speed
                    while True:  # polls the stand-in's count (it runs in another thread)
                        if len(standin.meter_events()) >= before + shadows * quarter // 4:
                            break
                        await anyio.sleep(0.01)
                    standin.expire_meter_sessions()

            with anyio.fail_after(180):
                async with anyio.create_task_group() as group:
                    group.start_soon(expire_sessions)
                    await worker.drain()
            standin.faults.clear()
            stream_calls = [
                r for r in standin.requests if r.path == "/v2/billing/meter_event_stream"
            ]
            assert max(r.event_count or 0 for r in stream_calls) == 100
            assert engine.writer.stream.renewals >= 2
            await assert_exact(engine, builder, oracle)
        finally:
            await engine.aclose()


@pytest.mark.slow
class TestRedisRestart:
    """Redis restarted (with persistence) while usage keeps arriving: nothing lost, nothing doubled."""

    async def test_restart_during_traffic(self, own_redis, standin_url, standin, tmp_path):
        """Callers keep recording through the outage (half the customers at shadow, half at
        primary); Stripe's summaries and the ledger hold, on both legs, exactly what callers were
        told at the stage the test set."""
        settings = fault_settings(
            own_redis.url,
            "dwtest-restart-traffic",
            standin_url,
            spool_dir=str(tmp_path / "spool"),
            spool_replay_seconds=0.1,
        ).model_copy(
            update={
                "redis": fault_settings(
                    own_redis.url, "dwtest-restart-traffic", standin_url
                ).redis.model_copy(update={"socket_timeout": 0.3, "connect_timeout": 0.3})
            }
        )
        builder = ScenarioBuilder(standin_url, STRIPE_KEY)
        scenarios = [await builder.customer(f"Restart {index}") for index in range(10)]
        count = max(EVENTS // 5, 500)
        rng = random.Random(count)
        plan = [(rng.choice(scenarios), rng.randint(1, 20)) for _ in range(count)]
        oracle = Oracle()
        for index, scenario in enumerate(scenarios):
            oracle.set_stage(scenario, (Stage.SHADOW, Stage.PRIMARY)[index % 2])
        engine = DualWriteEngine.from_settings(settings)
        # The stages come from the test, not from Redis: an outage would otherwise answer the safe
        # stage (legacy, no shadow; tests/engine/test_engine.py covers that) and the oracle could not tell
        # which legs each event must reach. This test is about the commit, spool and outbox.
        engine.resolver = FixedStages(oracle.stages)
        async with engine:
            gate = anyio.Semaphore(16)

            async def send(index: int, scenario, quantity: int) -> None:
                async with gate:
                    event = usage(scenario, quantity, identifier=f"restart-{index}")
                    for _ in range(50):  # a caller retrying with its Idempotency-Key
                        try:
                            outcome = await engine.record(event)
                        except ConflictError:
                            await anyio.sleep(0.1)
                            continue
                        if outcome.accepted:
                            oracle.tell(
                                scenario, quantity, timestamp=event.timestamp, accepted=True
                            )
                            return
                        await anyio.sleep(0.1)
                    raise AssertionError(f"usage {index} was never accepted")

            async def restart() -> None:
                while (
                    True
                ):  # polls the stand-in (another thread) until a third of the traffic is in
                    if len(standin.usage_records()) >= count // 4:
                        break
                    await anyio.sleep(0.01)
                own_redis.stop()
                await anyio.sleep(0.5)
                own_redis.start()

            with anyio.fail_after(240):
                async with anyio.create_task_group() as group:
                    group.start_soon(restart)
                    for index, (scenario, quantity) in enumerate(plan):
                        group.start_soon(send, index, scenario, quantity)
                while True:  # the engine's replayer empties the spool in the background
                    if engine.spool is None or not engine.spool.pending():
                        break
                    await anyio.sleep(0.05)
                await engine.new_worker().drain()
            await oracle.assert_stripe(builder.client)
            await oracle.assert_ledger(engine.ledger)
            assert len(oracle.told) == count
        await builder.aclose()
