"""Issue 13's cases 1-4 together, at volume: 5,000+ usage events through two front doors, Stripe
faults, stage flips every few hundred events, the proxy SIGKILLed twice, host clocks 2 s ahead of
and behind Stripe's, across a billing-period rollover.

The callers behave as Stripe's SDKs do: each event has an Idempotency-Key and is retried with it
until acknowledged (409, 429, 5xx, a dropped connection). The test's own oracle is what it told
itself was acknowledged; Stripe's totals are read back through its summary endpoints, per customer
and billing period: intended = legacy = meter, to the unit, and no shadow write dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import SecretStr

from dualwrite.config import Settings, UsageRoute
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore, StageResolver
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import Stage
from dualwrite.proxy import HEALTH_PATH
from dualwrite.testing import StripeStandin
from tests.cluster_support import free_port_pair
from tests.conftest import STRIPE_KEY
from tests.scenarios.test_billing_correctness import (
    USAGE_ROUTE,
    crash_config,
    eventually,
    skewed,
    unfinished_claims,
    usage_app,
    usage_path,
)
from tests.scenarios.test_multiprocess import Processes, wait_until_up
from tests.support import (
    Scenario,
    ScenarioBuilder,
    legacy_summaries,
    meter_summary,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CUSTOMERS = 40
SET_CUSTOMERS = 8  # the first ones report with action=set, sequentially per timestamp
EVENTS_PER_PHASE = 2_500
FLIP_EVERY = 300
KILL_AT = 0.45  # of each phase's events
CONCURRENCY = 48
RETRYABLE = {409, 429, 500, 502, 503, 504}


@dataclass
class Oracle:
    """What the callers were told: acknowledged increments and sets, with their timestamps."""

    increments: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """customer -> (timestamp, quantity) of every acknowledged increment."""
    sets: dict[tuple[str, int], int] = field(default_factory=dict)
    """(customer, timestamp) -> the last value acknowledged there."""

    def intended(self, customer: str, start: int, end: int) -> int:
        """What the customer's period ``[start, end)`` should hold on both legs."""
        total = sum(q for ts, q in self.increments.get(customer, []) if start <= ts < end)
        return total + sum(
            value for (who, ts), value in self.sets.items() if who == customer and start <= ts < end
        )


class Callers:
    """Usage callers behaving as Stripe's SDKs: one key per event, retried until acknowledged."""

    def __init__(self, scenarios: list[Scenario], apps: list[httpx.AsyncClient], oracle: Oracle):
        self.scenarios = scenarios
        self.apps = apps
        self.oracle = oracle
        self.proxy: httpx.AsyncClient | None = None
        self.engines: list[DualWriteEngine] = []
        """The apps' engines (their stage resolvers' counters say why a stage was safe)."""
        self.sent = 0
        self.acked = 0
        self._set_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._rng = random.Random(13)

    async def _post(self, door: int, scenario: Scenario, body: dict[str, Any], key: str) -> int:
        """One event until acknowledged; returns its timestamp as the reply tells it."""
        for attempt in range(400):
            try:
                if door == 0:
                    form = {"quantity": str(body["quantity"])}
                    if "timestamp" in body:
                        form["timestamp"] = str(body["timestamp"])
                        form["action"] = body["action"]
                    assert self.proxy is not None
                    response = await self.proxy.post(
                        usage_path(scenario), data=form, headers={"Idempotency-Key": key}
                    )
                else:
                    response = await self.apps[door - 1].post(
                        f"/usage/{scenario.customer}",
                        json={"item": scenario.item, **body},
                        headers={"Idempotency-Key": key},
                    )
            except httpx.TransportError:
                await anyio.sleep(min(0.05 * 2**attempt, 1.0))  # the proxy died: retry
                continue
            if response.status_code == 200:
                reply = response.json()
                # The middleware says at which stage it recorded: legacy only (the safe stage, a
                # stage read that timed out) is not what this test's oracle counts on.
                assert reply.get("stage", "shadow") != "legacy", (
                    "safe stage",
                    key,
                    [
                        e.resolver.stats
                        for e in self.engines
                        if isinstance(e.resolver, StageResolver)
                    ],
                )
                return int(reply["timestamp"])
            assert response.status_code in RETRYABLE, (response.status_code, response.text)
            await anyio.sleep(min(0.02 * 2**attempt, 1.0))
        pytest.fail(f"event {key} was never acknowledged")

    async def one(self, index: int, set_timestamps: list[int]) -> None:
        """Send event ``index`` (an increment, or a set for the first customers)."""
        scenario = self.scenarios[index % CUSTOMERS]
        door = self._rng.choice([0, 0, 1, 2])  # the proxy, or the app 2 s ahead or behind
        quantity = self._rng.randint(1, 9)
        key = f"vol-{index}-{scenario.customer}"
        self.sent += 1
        if index % CUSTOMERS < SET_CUSTOMERS:
            ts = self._rng.choice(set_timestamps)
            lock = self._set_locks.setdefault((scenario.customer, ts), asyncio.Lock())
            async with lock:  # one caller per timestamp: the last one acknowledged is the value
                body = {"quantity": quantity, "timestamp": ts, "action": "set"}
                await self._post(door, scenario, body, key)
                self.oracle.sets[(scenario.customer, ts)] = quantity
        else:
            ts = await self._post(door, scenario, {"quantity": quantity}, key)
            self.oracle.increments.setdefault(scenario.customer, []).append((ts, quantity))
        self.acked += 1


def patient_engine(settings: Settings, clock: Callable[[], float]) -> DualWriteEngine:
    """An engine whose stage reads wait up to 30 s for Redis. The test process runs the stand-in
    and two apps on a loaded machine: a read that took longer than the default 1 s would answer
    the safe stage (legacy only), as designed, and such usage never reaches the meter."""
    engine = DualWriteEngine.from_settings(settings, clock=clock)
    engine.resolver = StageResolver(
        engine.redis, engine.keys, settings.flags, clock=clock, lookup_timeout=30.0
    )
    return engine


async def minute_anchored(builder: ScenarioBuilder, standin: StripeStandin) -> list[Scenario]:
    """``CUSTOMERS`` customers on the legacy price, anchored on the last whole minute (so that
    meter event summaries can be cut on their periods)."""
    now = standin.clock.now()
    return [await builder.customer(f"volume {n}", anchor=now - now % 60) for n in range(CUSTOMERS)]


async def test_cases_1_to_4_at_volume_intended_equals_legacy_equals_meter(
    tmp_path: Path, redis_url, key_prefix, standin_url, builder, standin: StripeStandin
):
    """5,200 events over two billing periods, 4 % Stripe faults (500, 429, replies later than
    the timeout), a stage flip every 300 events, the proxy SIGKILLed twice, host clocks 2 s off
    Stripe's, sets on a fifth of the customers: per customer and period, what the callers were
    told equals Stripe's legacy total equals its meter total, and nothing is dead-lettered."""
    scenarios = await minute_anchored(builder, standin)
    config = crash_config(
        tmp_path / "dualwrite.toml",
        redis_url=redis_url,
        prefix=key_prefix,
        standin=standin_url,
        scenarios=scenarios,
    )
    # Replies held back by a "timeout" fault (3 s) outlast the 2 s timeout: the caller gets a
    # 504 and retries. Claims of a killed proxy fall due after 8 s.
    # Redis answers slowly on a loaded machine: a stage read that timed out would record usage at
    # the safe stage (legacy only), as designed, but not as this test intends.
    text = config.read_text().replace("inflight_lease_seconds = 3", "inflight_lease_seconds = 8")
    text = text.replace("shards = 4\n", "shards = 4\nsocket_timeout = 10\n")
    config.write_text(text.replace("timeout = 15.0", "timeout = 2.0"), encoding="utf-8")
    settings = Settings.load(config).model_copy(
        update={
            "routes": (UsageRoute.model_validate(USAGE_ROUTE),),
            "stripe_api_key": SecretStr(STRIPE_KEY),
        }
    )
    control = DualWriteEngine.from_settings(settings)
    await control.start(worker=False)
    clocks = [skewed(2.0), skewed(-2.0)]
    engines = [patient_engine(settings, clock) for clock in clocks]
    apps = [
        httpx.AsyncClient(
            transport=httpx.ASGITransport(
                app=DualWriteMiddleware(usage_app(), engine=engine, clock=clock)
            ),
            base_url="http://app",
            timeout=30,
        )
        for engine, clock in zip(engines, clocks, strict=True)
    ]
    env = {
        **os.environ,
        "STRIPE_API_KEY": STRIPE_KEY,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "DUALWRITE_CONFIG": str(config),
    }
    processes = Processes(tmp_path, env)
    oracle = Oracle()
    callers = Callers(scenarios, apps, oracle)
    callers.engines = engines
    flags = RedisFlagStore(control.redis, control.keys)
    rng = random.Random(21)
    stages = {s.customer: Stage.SHADOW for s in scenarios}
    kills = 0
    try:
        for engine in engines:
            await engine.start(worker=False)
        for scenario in scenarios:
            await flags.set_override(scenario.customer, Stage.SHADOW, actor="tests")

        async def start_proxy() -> None:
            port = free_port_pair()
            processes.start(f"proxy-{kills}", "serve", "--port", str(port), "--no-access-log")
            url = f"http://127.0.0.1:{port}"
            await wait_until_up(url + HEALTH_PATH, f"proxy-{kills}", processes)
            if callers.proxy is not None:
                await callers.proxy.aclose()
            limits = httpx.Limits(
                max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY
            )
            callers.proxy = httpx.AsyncClient(
                base_url=url,
                headers={"Authorization": f"Bearer {STRIPE_KEY}"},
                timeout=30,
                limits=limits,
            )

        await start_proxy()
        for n in range(2):
            processes.start(f"worker-{n}", "worker", "--name", f"volume-{n}")

        async def flip() -> None:
            for scenario in rng.sample(scenarios, CUSTOMERS // 4):
                stage = Stage.PRIMARY if stages[scenario.customer] is Stage.SHADOW else Stage.SHADOW
                stages[scenario.customer] = stage
                await flags.set_override(scenario.customer, stage, actor="tests", reason="flip")

        standin.clock.advance(60)  # the sets' timestamps below are in the period's past
        for phase in range(2):
            start, end = await current_period(builder, scenarios[0], standin.clock.now())
            set_timestamps = [start + 10, start + 20, start + 30]
            standin.faults.configure(
                rate=0.04, kinds=["500", "429", "timeout"], timeout_seconds=3.0, seed=phase
            )
            slots = anyio.Semaphore(CONCURRENCY)
            first = phase * EVENTS_PER_PHASE

            async def event(index: int, timestamps: list[int], slots: anyio.Semaphore) -> None:
                try:
                    await callers.one(index, timestamps)
                finally:
                    slots.release()

            async with anyio.create_task_group() as group:
                for index in range(first, first + EVENTS_PER_PHASE):
                    await slots.acquire()  # CONCURRENCY events in flight, started in order
                    group.start_soon(event, index, set_timestamps, slots)
                    if index % FLIP_EVERY == 0:
                        await flip()
                    if index == first + int(EVENTS_PER_PHASE * KILL_AT):
                        processes.running[f"proxy-{kills}"].kill()  # SIGKILL, requests in flight
                        processes.running.pop(f"proxy-{kills}").wait()
                        kills += 1
                        await start_proxy()
            standin.faults.clear()

            async def settled() -> bool:
                depth = await control.outbox.depth()
                claims = await unfinished_claims(control)
                return claims == 0 and depth.outstanding == 0 and depth.pending == 0

            await eventually(settled, seconds=240)
            if phase == 0:  # into the next billing period, with nothing in flight
                standin.clock.advance(end - standin.clock.now() + 3_600)
                # The stand-in's clock jumped (Stripe's never does): let each app see it in a
                # reply before its callers send timestamps of the new period.
                for engine in engines:
                    await engine.retrieve_item(scenarios[0].item, api_key=STRIPE_KEY)
                assert callers.proxy is not None
                assert (
                    await callers.proxy.get(f"/v1/customers/{scenarios[0].customer}")
                ).is_success
        dead = [await control.redis.xrange(shard.dead) for shard in control.keys.all_shards()]
    finally:
        standin.faults.clear()
        processes.stop_all()
        if callers.proxy is not None:
            await callers.proxy.aclose()
        for app in apps:
            await app.aclose()
        for engine in (*engines, control):
            await engine.aclose()
    assert kills == 2 and callers.acked == callers.sent == 2 * EVENTS_PER_PHASE
    assert not any(dead), dead
    checked = 0
    for scenario in scenarios:
        for (start, end), legacy in (await legacy_summaries(builder.client, scenario.item)).items():
            meter = await meter_summary(
                builder.client, scenario.meter, scenario.customer, start, end
            )
            intended = oracle.intended(scenario.customer, start, end)
            assert intended == legacy == meter, (scenario.customer, start, intended, legacy, meter)
            checked += intended > 0
    assert checked >= CUSTOMERS * 2 - 2  # (nearly) every customer has usage in both periods


async def current_period(builder: ScenarioBuilder, scenario: Scenario, now: int) -> tuple[int, int]:
    """The scenario's billing period holding ``now``, as Stripe's summaries cut it."""
    periods = await legacy_summaries(builder.client, scenario.item)
    [period] = [(start, end) for start, end in periods if start <= now < end]
    return period
