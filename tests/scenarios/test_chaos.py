"""Chaos: usage through ``dualwrite serve`` with two ``dualwrite worker`` processes while Redis
restarts under them, judged by the Stripe stand-in's own summaries against what callers were told.

(a) Redis with ``appendonly yes`` and ``appendfsync always``, restarted mid-traffic: nothing lost,
nothing doubled, on either leg of any customer: Stripe's summaries and the ledger hold what the
oracle (``tests/oracle.py``) heard callers were told. (b) Redis restarted empty: the loss is detected by
every process, health and the report say so (no parity anywhere), and reconcile names every
customer whose usage the ledger lost.

Customers are at ``shadow`` and ``primary`` with ``[flags] safe_stage = "shadow"``: whichever of
those a request resolves to (Redis down means the safe stage), both legs are written once, so
every leg must hold exactly what the callers were told.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import stripe

from dualwrite.config import RedisSettings, Settings
from dualwrite.durability import read_loss
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.periods import Period
from dualwrite.proxy import HEALTH_PATH
from dualwrite.reconcile import Reconciler
from dualwrite.redis_client import open_redis
from dualwrite.report import build_report
from dualwrite.testing import StripeStandin
from tests.cluster_support import free_port_pair
from tests.conftest import STRIPE_KEY, OwnRedis
from tests.oracle import Oracle
from tests.reconcile.test_reconcile import SETTLE, anchored_customer
from tests.scenarios import test_multiprocess
from tests.scenarios.test_multiprocess import Processes, wait_until_up
from tests.support import EVENT_NAME, LEGACY_VERSION, Scenario, ScenarioBuilder, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: The child processes' fixture, shared with the multi-process test.
processes = test_multiprocess.processes
PREFIX = "dwtest-chaos"
CUSTOMERS = 6
REQUESTS = 300
RATE = 30.0
AUTH = {"Authorization": f"Bearer {STRIPE_KEY}"}


@dataclass(frozen=True)
class Customer:
    """A customer of the run: its id, legacy item and stage, and its Stripe objects."""

    id: str
    item: str
    stage: Stage
    scenario: Scenario


@dataclass
class Load:
    """What callers sent and were told."""

    intended: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    given_up: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    oracle: Oracle = field(default_factory=Oracle)


async def caller(client: httpx.AsyncClient, customer: Customer, quantity: int, load: Load) -> None:
    """One usage record as an SDK sends it (stamped by the caller): retried with its
    Idempotency-Key on 409, 429, 5xx and network errors for up to a minute; counted as told once
    answered 2xx."""
    headers = {"Idempotency-Key": f"chaos-{uuid.uuid4().hex}", "Stripe-Version": LEGACY_VERSION}
    path = f"/v1/subscription_items/{customer.item}/usage_records"
    timestamp = int(time.time())
    body = {"quantity": quantity, "timestamp": timestamp}
    load.sent += 1
    with anyio.move_on_after(60):
        for attempt in itertools.count():
            try:
                response = await client.post(path, data=body, headers=headers)
            except httpx.TransportError:
                status = None
            else:
                status = response.status_code
                if status < 300:
                    load.intended[customer.id] += quantity
                    load.oracle.tell(
                        customer.scenario, quantity, timestamp=timestamp, accepted=True
                    )
                    return
                if status not in (409, 429) and status < 500:
                    load.refused[status] += 1
                    return
            await anyio.sleep(min(0.1 * 2**attempt, 2.0))
    load.given_up += 1


@dataclass
class Rig:
    """What one chaos run set up."""

    redis: OwnRedis
    processes: Processes
    proxy_url: str
    customers: list[Customer]
    meter: str
    sdk: stripe.StripeClient
    standin_url: str


def write_config(path: Path, redis_url: str, api_base: str, legacy_price: str) -> None:
    """The proxy's and workers' configuration."""
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nkey_prefix = "{PREFIX}"\n'
        "socket_timeout = 0.3\nconnect_timeout = 0.3\n\n"
        f'[stripe]\napi_base = "{api_base}"\ntimeout = 3.0\n\n'
        '[flags]\nsafe_stage = "shadow"\n\n'
        "[outbox]\nrun_in_process = false\nclaim_idle_seconds = 2\nblock_ms = 50\n"
        "backoff_base = 0.05\nbackoff_max = 1\nspool_replay_seconds = 0.2\n\n"
        "[guardrails]\nenabled = false\n\n"
        f'[[meters]]\nevent_name = "{EVENT_NAME}"\nlegacy_prices = ["{legacy_price}"]\n',
        encoding="utf-8",
    )


@asynccontextmanager
async def rig_on(
    redis: OwnRedis, processes: Processes, standin: StripeStandin, standin_url: str
) -> AsyncIterator[Rig]:
    """Customers (half shadow, half primary), the proxy and two workers on ``redis``."""
    http = stripe.HTTPXClient()
    sdk = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": standin_url}, http_client=http)
    now = standin.clock.now()
    async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
        scenarios = [
            await anchored_customer(builder, f"chaos {index}", now - now % 3600)
            for index in range(CUSTOMERS)
        ]
    stages = [Stage.SHADOW if index % 2 else Stage.PRIMARY for index in range(CUSTOMERS)]
    customers = [
        Customer(scenario.customer, scenario.item, stage, scenario)
        for scenario, stage in zip(scenarios, stages, strict=True)
    ]
    client = open_redis(RedisSettings(url=redis.url, key_prefix=PREFIX))
    try:
        store = RedisFlagStore(client, KeySpace(PREFIX))
        for customer in customers:
            await store.set_override(customer.id, customer.stage, actor="chaos", reason="chaos")
    finally:
        await client.aclose()
    write_config(
        processes.directory / "dualwrite.toml", redis.url, standin_url, scenarios[0].legacy_price
    )
    port = free_port_pair()
    processes.start("proxy", "serve", "--port", str(port), "--no-access-log")
    proxy_url = f"http://127.0.0.1:{port}"
    await wait_until_up(proxy_url + HEALTH_PATH, "proxy", processes)
    for name in ("worker1", "worker2"):
        processes.start(name, "worker", "--name", f"chaos-{name}")
    # Each worker has seen the markers before the traffic (only a process that saw them can
    # tell they are gone).
    await eventually(
        lambda: all("delivering from" in processes.log(name) for name in ("worker1", "worker2")),
        within=30,
        what="the workers starting",
    )
    try:
        yield Rig(redis, processes, proxy_url, customers, scenarios[0].meter, sdk, standin_url)
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]


async def traffic(rig: Rig, *, restart_after: int) -> Load:
    """``REQUESTS`` usage records at ``RATE``/s through the proxy, round-robin over the
    customers, each retried as an SDK does; Redis restarts after ``restart_after`` of them."""
    load = Load()
    for customer in rig.customers:
        load.oracle.set_stage(customer.scenario, customer.stage)

    async def restart() -> None:
        await eventually(lambda: load.sent >= restart_after, within=60, what="the traffic")
        await anyio.to_thread.run_sync(rig.redis.stop)
        await anyio.sleep(1.0)
        await anyio.to_thread.run_sync(rig.redis.start)  # empty without persistence

    async with (
        httpx.AsyncClient(base_url=rig.proxy_url, headers=AUTH, timeout=10) as client,
        anyio.create_task_group() as group,
    ):
        group.start_soon(restart)
        start = time.monotonic()
        for index in range(REQUESTS):
            wait = start + index / RATE - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
            customer = rig.customers[index % len(rig.customers)]
            group.start_soon(caller, client, customer, 1 + index % 7, load)
    return load


async def drained(rig: Rig) -> dict[str, Any]:
    """The proxy's health once the outbox holds nothing outstanding or pending."""
    health: dict[str, Any] = {}

    async def empty() -> bool:
        nonlocal health
        async with httpx.AsyncClient(timeout=5) as client:
            health = (await client.get(rig.proxy_url + HEALTH_PATH)).json()
        outbox = health.get("outbox") or {}
        return outbox.get("outstanding") == 0 and outbox.get("pending") == 0

    with anyio.fail_after(120):
        while True:  # polls the proxy, a process of its own
            if await empty():
                return health
            await anyio.sleep(0.5)


async def stripe_summaries(rig: Rig, customer: Customer, period: Period) -> tuple[int, int]:
    """What Stripe (the stand-in) says the customer's legacy item and meter hold for ``period``,
    read through the official SDK from its summary endpoints."""
    summaries = await rig.sdk.raw_request_async(
        "get",
        f"/v1/subscription_items/{customer.item}/usage_record_summaries",
        stripe_version=LEGACY_VERSION,
    )
    data = summaries.data["data"]
    legacy = sum(
        int(summary["total_usage"])
        for summary in data
        if summary["period"]["start"] == period.start
    )
    meter_summaries = await rig.sdk.v1.billing.meters.event_summaries.list_async(
        rig.meter,
        {
            "customer": customer.id,
            "start_time": period.start - period.start % 60,
            "end_time": period.end - period.end % 60,
        },
    )
    meter = sum(int(summary.aggregated_value) for summary in meter_summaries.data)
    return legacy, meter


async def current_period(rig: Rig) -> Period:
    """The one billing period every customer's usage is in (from the first customer's item)."""
    item = await rig.sdk.v1.subscription_items.retrieve_async(
        rig.customers[0].item, options={"stripe_version": LEGACY_VERSION}
    )
    return Period(
        start=item["current_period_start"], end=item["current_period_end"], kind="billing"
    )


@pytest.fixture
async def rig(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    processes: Processes,
    standin: StripeStandin,
    standin_url: str,
) -> AsyncIterator[Rig]:
    """The rig on a Redis of its own: append-only (fsync always) when the test is parametrized
    with ``True``, without persistence with ``False``."""
    server = OwnRedis(tmp_path / "redis", appendonly=request.param)
    server.start()
    try:
        async with rig_on(server, processes, standin, standin_url) as running:
            yield running
    finally:
        server.stop()


@pytest.mark.parametrize("rig", [True], indirect=True)
async def test_restart_with_append_only_file_loses_and_doubles_nothing(rig: Rig):
    """appendonly yes, appendfsync always: after a restart mid-traffic, every customer's legacy
    and meter summaries, and its ledger rows, hold exactly what callers were told (the oracle);
    nothing is dead, no loss reported."""
    load = await traffic(rig, restart_after=REQUESTS // 3)
    assert load.given_up == 0 and not load.refused, load
    health = await drained(rig)
    assert health["outbox"]["dead"] == 0
    assert health["redis_data_lost"] is None and "redis_data_lost" not in health["problems"]
    assert all(load.intended[customer.id] > 0 for customer in rig.customers)
    await load.oracle.assert_stripe(rig.sdk)
    settings = Settings(
        redis={"url": rig.redis.url, "key_prefix": PREFIX},
        stripe={"api_base": rig.standin_url},
        STRIPE_API_KEY=STRIPE_KEY,
    )
    engine = DualWriteEngine.from_settings(settings)
    try:
        await load.oracle.assert_ledger(engine.ledger)
    finally:
        await engine.aclose()


@pytest.mark.parametrize("rig", [False], indirect=True)
async def test_empty_restart_is_detected_reported_and_reconciled(rig: Rig, standin: StripeStandin):
    """Redis restarted empty: health says redis_data_lost, every process logged it, the report
    claims no parity, Stripe holds no unit twice, and reconcile names every customer."""
    load = await traffic(rig, restart_after=REQUESTS // 3)
    assert load.given_up == 0 and not load.refused, load
    await drained(rig)
    workers = ("worker1", "worker2")
    try:
        await eventually(
            lambda: all("REDIS LOST DATA" in rig.processes.log(name) for name in workers),
            within=20,
            what="both workers reporting the loss",
        )
    except BaseException:
        print(*(rig.processes.log(name)[-4000:] for name in workers), sep="\n")
        raise
    async with httpx.AsyncClient(timeout=5) as client:
        health = (await client.get(rig.proxy_url + HEALTH_PATH)).json()
    assert health["status"] == "degraded" and "redis_data_lost" in health["problems"]
    assert "dualwrite reconcile" in health["redis_data_lost"]["action"]
    assert "REDIS LOST DATA" in rig.processes.log("proxy")
    period = await current_period(rig)
    for customer in rig.customers:  # nothing doubled
        legacy, meter = await stripe_summaries(rig, customer, period)
        assert legacy <= load.intended[customer.id] and meter <= load.intended[customer.id]
    settings = Settings(
        redis={"url": rig.redis.url, "key_prefix": PREFIX},
        stripe={"api_base": rig.standin_url},
        reconcile={"reads_per_second": 0},
        STRIPE_API_KEY=STRIPE_KEY,
    )
    engine = DualWriteEngine.from_settings(settings)
    try:
        assert await read_loss(engine.redis, engine.keys) is not None
        report = await build_report(engine.ledger, engine.resolver)
        assert report.ledger_incomplete_since is not None
        assert report.customers and all(line.status != "parity" for line in report.customers)
        standin.clock.advance(period.end - standin.clock.now() + SETTLE + 60)
        reconciler = Reconciler.from_settings(
            settings, stores=engine.stores, clock=standin.clock.now
        )
        try:
            run = await reconciler.run(period.id)
        finally:
            await reconciler.aclose()
    finally:
        await engine.aclose()
    named = Counter(record.customer for record in run.drifted)
    assert set(named) == {customer.id for customer in rig.customers}, run
