"""Redis Sentinel: ``redis+sentinel://`` URLs, and a real failover (three sentinels on loopback,
``SENTINEL FAILOVER``) during traffic: nothing doubled, and anything lost reported by reconcile.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dualwrite.config import RedisSettings, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import ConfigError, StoreUnavailableError
from dualwrite.models import Stage
from dualwrite.periods import Period
from dualwrite.reconcile import Reconciler
from dualwrite.redis_client import open_redis
from dualwrite.redis_url import SentinelAddress, parse_sentinel_url
from dualwrite.testing import RedisServerError, StripeStandin
from tests.conftest import STRIPE_KEY
from tests.reconcile.test_reconcile import SETTLE, anchored_customer
from tests.sentinel_support import SERVICE, LocalSentinel
from tests.support import (
    EVENT_NAME,
    ScenarioBuilder,
    eventually,
    make_settings,
    record_as_caller,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio


class TestUrl:
    """``redis+sentinel://sentinels/master[/db]``, as kombu and others write it."""

    def test_sentinels_master_and_database(self):
        """Each sentinel, the master's name, the database, TLS and the master's credentials."""
        address = parse_sentinel_url("rediss+sentinel://user:p%40ss@s1:26379,[::1]:26380/main/3")
        assert address == SentinelAddress(
            sentinels=(("s1", 26379), ("::1", 26380)),
            service="main",
            db=3,
            tls=True,
            username="user",
            password="p@ss",
        )
        assert "p@ss" not in repr(address)
        assert parse_sentinel_url("redis+sentinel://h:26379/mymaster").db == 0

    @pytest.mark.parametrize(
        ("url", "hint"),
        [
            ("redis+sentinel://h:26379", "/<master name>"),
            ("redis+sentinel://h:26379/", "/<master name>"),
            ("redis+sentinel://h:26379/m/x", "/<master name>[/<db>]"),
            ("redis+sentinel://h/m", "each sentinel must be host:port"),
            ("redis+sentinel://:secret@h:99999/m", "each sentinel must be host:port"),
            ("redis+sentinel://h:26379/m?timeout=1", "takes no options"),
        ],
    )
    def test_malformed_url_is_refused(self, url, hint, clean_environment):
        """A bad URL stops the configuration with the fix, never the password."""
        with pytest.raises(ConfigError) as raised:
            Settings.load(redis={"url": url})
        assert hint in str(raised.value) and "redis.url" in str(raised.value)
        assert "secret" not in str(raised.value)


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[LocalSentinel]:
    """A master, a replica and three sentinels of this test's own."""
    local = LocalSentinel(tmp_path)
    try:
        local.start()
    except (RedisServerError, OSError) as exc:
        local.stop()
        pytest.fail(f"could not start the test Sentinel set-up: {exc}", pytrace=False)
    yield local
    local.stop()


class TestFailover:
    """``SENTINEL FAILOVER`` while callers record usage through a sentinel-managed engine."""

    async def test_failover_during_traffic(
        self, sentinel: LocalSentinel, standin: StripeStandin, standin_url, tmp_path
    ):
        """Callers retry until recorded; afterwards Stripe holds no unit twice, and every
        customer whose ledger or shadow leg lost something is named by reconcile."""
        settings = make_settings(
            redis_url=sentinel.url,
            prefix="dwtest-sentinel",
            api_base=standin_url,
            api_key=STRIPE_KEY,
            redis={"socket_timeout": 0.5, "connect_timeout": 0.5},
            outbox={"spool_dir": str(tmp_path / "spool"), "spool_replay_seconds": 0.2},
            ledger={"periods": "billing"},
            reconcile={"reads_per_second": 0},
        )
        now = standin.clock.now()
        async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
            scenarios = [
                await anchored_customer(builder, f"sentinel {index}", now - now % 3600)
                for index in range(6)
            ]
        told: Counter[str] = Counter()
        count = 240
        rng = random.Random(count)
        plan = [(rng.choice(scenarios), rng.randint(1, 9)) for _ in range(count)]
        async with DualWriteEngine.from_settings(settings) as engine:
            for scenario in scenarios:
                await set_stage(engine, scenario.customer, Stage.SHADOW)
            gate = anyio.Semaphore(8)

            async def send(index: int, scenario, quantity: int) -> None:
                async with gate:
                    await record_as_caller(
                        engine, usage(scenario, quantity, identifier=f"s-{index}")
                    )
                    told[scenario.item] += quantity

            async def fail_over() -> None:
                await eventually(
                    lambda: len(standin.usage_records()) >= count // 3,
                    within=120,
                    what="a third of the traffic",
                )
                old = sentinel.master_port()
                assert await anyio.to_thread.run_sync(sentinel.failover) != old

            with anyio.fail_after(180):
                async with anyio.create_task_group() as group:
                    group.start_soon(fail_over)
                    for index, (scenario, quantity) in enumerate(plan):
                        group.start_soon(send, index, scenario, quantity)
                spool = engine.spool
                await eventually(
                    lambda: spool is None or not spool.pending(), within=60, what="the spool"
                )
                await drained(engine)
            assert sentinel.master_port() == sentinel.replica.port
            # Nothing doubled: Stripe holds exactly what callers were told, never more.
            held = {
                scenario.customer: (
                    standin.legacy_total(scenario.item),
                    int(standin.meter_total(scenario.customer, EVENT_NAME)),
                )
                for scenario in scenarios
            }
            for scenario in scenarios:
                legacy, meter = held[scenario.customer]
                assert legacy == told[scenario.item] and meter <= told[scenario.item]
            rows = await engine.ledger.rows()
            [period] = {row.period for row in rows}
            ledger = {
                scenario.customer: (
                    sum(r["legacy_accepted_qty"] for r in rows if r.customer == scenario.customer),
                    sum(r["meter_accepted_qty"] for r in rows if r.customer == scenario.customer),
                )
                for scenario in scenarios
            }
            span = Period.parse(period)
            standin.clock.advance(span.end - standin.clock.now() + SETTLE + 60)
            reconciler = Reconciler.from_settings(
                settings, stores=engine.stores, clock=standin.clock.now
            )
            try:
                run = await reconciler.run(
                    period, customers=[scenario.customer for scenario in scenarios]
                )
            finally:
                await reconciler.aclose()
        flagged = {
            record.customer
            for record in run.records
            if record.legacy.drift
            or record.meter.drift
            or record.meter.stripe_qty != record.meter.expected_qty
        }
        for scenario in scenarios:
            legacy, meter = held[scenario.customer]
            complete = ledger[scenario.customer] == (legacy, meter) and meter == legacy
            assert (scenario.customer in flagged) == (not complete), (scenario, ledger, run)


async def test_engine_reaches_the_master_through_sentinel(sentinel: LocalSentinel, key_prefix):
    """A sentinel-managed client writes to the master the sentinels name, and reads it back."""
    settings = RedisSettings(url=sentinel.url, key_prefix=key_prefix)
    client = open_redis(settings)
    try:
        await client.set(f"{key_prefix}:probe", "1")
        assert await client.get(f"{key_prefix}:probe") == "1"
        assert (await client.info("server"))["tcp_port"] == sentinel.master.port
    finally:
        await client.aclose()
    assert SERVICE in sentinel.url


async def drained(engine: DualWriteEngine) -> None:
    """Deliver what the outbox holds, as a worker would: a pooled connection may still point at
    the old master for a moment after a failover (ReadOnlyError, then redis-py reconnects), and a
    worker tries again."""
    for _ in range(20):
        try:
            await engine.new_worker().drain()
            return
        except StoreUnavailableError:
            await anyio.sleep(0.5)
    await engine.new_worker().drain()
