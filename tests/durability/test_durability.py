"""Redis as a database: a Redis emptied or restarted under running processes (NOGROUP mended, the
worker's state changes logged), the start-up checks of its settings, and the data-loss marker.

Every test that restarts, empties or reconfigures Redis runs its own ``redis-server`` on a free port
(``tests/conftest.py``: ``OwnRedis``); the shared Redis is only ever read and written under the
test's key prefix.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from rich.console import Console
from starlette.applications import Starlette
from starlette.testclient import TestClient
from typer.testing import CliRunner

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.demo import DemoOptions, run_demo
from dualwrite.durability import DurabilityGuard, read_loss
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import RedisEvictionError
from dualwrite.keys import KeySpace
from dualwrite.metrics import REGISTRY
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import Stage
from dualwrite.proxy import ProxyApp
from dualwrite.redis_client import open_redis
from dualwrite.report import Report, build_report, render_table
from dualwrite.testing import RedisServerError, RedisServerProcess, StripeStandin
from tests.conftest import STRIPE_KEY, OwnRedis
from tests.proxy.test_proxy_serve import clean_env, free_port
from tests.support import (
    EVENT_NAME,
    Scenario,
    ScenarioBuilder,
    audit_entries,
    dualwrite_command,
    eventually,
    make_settings,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio


def own_settings(server: OwnRedis, standin_url: str, prefix: str = "dwtest-own", **sections):
    """This test's settings on its own Redis: quick timeouts, so an outage is noticed quickly."""
    redis = {"socket_timeout": 0.3, "connect_timeout": 0.3, **sections.pop("redis", {})}
    return make_settings(
        redis_url=server.url,
        prefix=prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        redis=redis,
        **sections,
    )


@asynccontextmanager
async def guarding(settings: Settings, **options: Any) -> AsyncIterator[DurabilityGuard]:
    """A ``DurabilityGuard`` on a Redis connection of its own (not started; stopped after)."""
    redis = open_redis(settings.redis)
    guard = DurabilityGuard(
        redis, KeySpace(settings.redis.key_prefix, settings.redis.shards), settings.redis, **options
    )
    try:
        yield guard
    finally:
        await guard.aclose()
        await redis.aclose()


def render(report: Report) -> str:
    """The report's table as the terminal shows it."""
    console = Console(width=250, record=True)
    console.print(render_table(report))
    return console.export_text()


@pytest.fixture
def empty_redis(tmp_path: Path):
    """A Redis of this test's own without persistence: a restart empties it."""
    server = OwnRedis(tmp_path / "redis", appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def running(
    empty_redis: OwnRedis, standin_url: str
) -> AsyncIterator[tuple[DualWriteEngine, Settings]]:
    """An engine with its in-process outbox worker running, on the test's own Redis."""
    settings = own_settings(empty_redis, standin_url)
    engine = DualWriteEngine.from_settings(settings)
    await engine.start()
    yield engine, settings
    await engine.aclose()


class TestEmptiedRedis:
    """Redis restarted empty under a running worker: the worker mends its consumer group."""

    async def test_next_shadow_write_is_delivered_after_an_empty_restart(
        self, running, empty_redis: OwnRedis, standin: StripeStandin, builder: ScenarioBuilder
    ):
        """NOGROUP (the stream and its group are gone) recreates the group, and the next shadow
        write reaches Stripe within a few seconds, without a new process."""
        engine, _ = running
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        assert (await engine.record(usage(scenario, 3))).accepted
        await eventually(
            lambda: standin.meter_total(scenario.customer, EVENT_NAME) == 3,
            within=10,
            what="the first shadow write",
        )
        empty_redis.stop()
        empty_redis.start()  # no persistence: empty
        await set_stage(engine, scenario.customer, Stage.SHADOW)  # the override went with it
        assert (await engine.record(usage(scenario, 4))).accepted
        await eventually(
            lambda: standin.meter_total(scenario.customer, EVENT_NAME) == 7,
            within=5,
            what="the shadow write after the empty restart",
        )


class TestWorkerStateLog:
    """The outbox worker says when it starts failing and when it is healthy again, once each."""

    async def test_outage_logs_failing_then_healthy(self, running, empty_redis: OwnRedis, caplog):
        """A Redis outage of many rounds: one line when the worker starts failing, one when it is
        healthy again, and nothing in between."""
        engine, _ = running
        worker = engine.worker
        assert worker is not None

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "dualwrite.outbox._worker"]

        with caplog.at_level(logging.INFO, logger="dualwrite.outbox"):
            empty_redis.stop()
            await anyio.sleep(1.5)  # many failed rounds
            empty_redis.start()
            await eventually(
                lambda: any("healthy again" in line for line in lines()),
                within=10,
                what="the worker saying it is healthy again",
            )
        failing = [line for line in lines() if "failing" in line]
        assert len(failing) == 1 and worker.consumer in failing[0], lines()
        [healthy] = [line for line in lines() if "healthy again" in line]
        assert worker.consumer in healthy and "failed round(s)" in healthy
        assert len(lines()) == 2, lines()


# ----------------------------------------------------------------------------- start-up checks


@pytest.fixture
def private_redis(tmp_path: Path):
    """Starts redis-servers of this test's own with extra arguments (stopped afterwards)."""
    started: list[RedisServerProcess] = []

    def start(*extra: str) -> RedisServerProcess:
        server = RedisServerProcess(tmp_path / f"redis{len(started)}", extra=extra)
        try:
            server.start()
        except RedisServerError as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


EVICTING = ("--maxmemory-policy", "allkeys-lru", "--maxmemory", "64mb")


def serve_command(config: Path, port: int) -> list[str]:
    """``dualwrite serve`` in a process of its own."""
    return dualwrite_command(
        "serve", "--config", str(config), "--port", str(port), "--no-access-log"
    )


def config_file(path: Path, redis_url: str, api_base: str, *, allow_eviction: bool = False) -> Path:
    """A minimal config file on ``redis_url``."""
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nkey_prefix = "dwtest-start"\n'
        f"allow_eviction = {'true' if allow_eviction else 'false'}\n\n"
        f'[stripe]\napi_base = "{api_base}"\n\n[[meters]]\nevent_name = "{EVENT_NAME}"\n',
        encoding="utf-8",
    )
    return path


class TestStartupChecks:
    """``serve``, ``worker``, the middleware's lifespan and the demo read Redis's settings first."""

    def test_serve_refuses_an_evicting_policy(self, private_redis, tmp_path, standin_url):
        """``dualwrite serve`` on an allkeys-lru Redis exits non-zero, naming the setting and the
        fix, before it listens."""
        server = private_redis(*EVICTING)
        config = config_file(tmp_path / "dw.toml", server.url, standin_url)
        done = subprocess.run(
            serve_command(config, free_port()),
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode != 0
        assert "maxmemory-policy is allkeys-lru" in done.stderr
        assert "CONFIG SET maxmemory-policy noeviction" in done.stderr
        assert "allow_eviction" in done.stderr
        assert "Traceback" not in done.stderr

    def test_worker_refuses_an_evicting_policy(self, private_redis, tmp_path, standin_url):
        """``dualwrite worker`` stops with exit status 2 and the same message."""
        server = private_redis(*EVICTING)
        config = config_file(tmp_path / "dw.toml", server.url, standin_url)
        done = subprocess.run(
            dualwrite_command("--config", str(config), "worker"),
            env={**clean_env(), "STRIPE_API_KEY": STRIPE_KEY},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "maxmemory-policy is allkeys-lru" in done.stderr
        assert "noeviction" in done.stderr

    def test_middleware_lifespan_refuses_and_allow_eviction_starts(
        self, private_redis, standin_url, caplog
    ):
        """The app's start fails on an evicting Redis; with ``allow_eviction`` it starts and
        warns instead."""
        server = private_redis(*EVICTING)
        settings = own_settings(server, standin_url)
        refused = DualWriteMiddleware(Starlette(), config=settings)
        with (
            pytest.raises(RedisEvictionError, match="maxmemory-policy is allkeys-lru"),
            TestClient(refused),
        ):
            pass
        allowed = DualWriteMiddleware(
            Starlette(), config=own_settings(server, standin_url, redis={"allow_eviction": True})
        )
        with caplog.at_level(logging.WARNING, logger="dualwrite.durability"), TestClient(allowed):
            assert allowed.durability.warnings() == ["redis_persistence_off", "redis_evicting"]
        assert "starting anyway" in caplog.text

    async def test_no_persistence_warns_sets_the_gauge_and_health(
        self, empty_redis: OwnRedis, standin_url, caplog
    ):
        """No persistence: a loud warning, ``dualwrite_redis_persistence`` 0, a health line; an
        append-only Redis: 2 and no warning."""
        proxy = ProxyApp(own_settings(empty_redis, standin_url))
        with caplog.at_level(logging.WARNING, logger="dualwrite.durability"):
            await proxy.startup()
        try:
            assert "REDIS HAS NO PERSISTENCE" in caplog.text
            assert REGISTRY.get_sample_value("dualwrite_redis_persistence") == 0
            status, health = await proxy.health()
            assert status == 200 and health["status"] == "ok"
            assert health["redis_persistence"] == "none"
            assert health["warnings"] == ["redis_persistence_off"]
        finally:
            await proxy.aclose()

    async def test_append_only_redis_is_quiet(self, own_redis: OwnRedis, standin_url, caplog):
        """appendonly yes, appendfsync always, noeviction: no warning, the gauge at 2."""
        async with guarding(own_settings(own_redis, standin_url)) as guard:
            with caplog.at_level(logging.WARNING, logger="dualwrite.durability"):
                await guard.start()
        assert caplog.text == ""
        assert guard.persistence == "aof" and guard.warnings() == []
        assert REGISTRY.get_sample_value("dualwrite_redis_persistence") == 2

    async def test_config_refused_is_said_once_and_start_goes_on(
        self, private_redis, standin_url, caplog
    ):
        """A Redis without CONFIG (as some managed services): one warning, the start goes on,
        the gauge says unknown."""
        server = private_redis("--rename-command", "CONFIG", "")
        async with guarding(own_settings(server, standin_url), interval=0.05) as guard:
            with caplog.at_level(logging.WARNING, logger="dualwrite.durability"):
                await guard.start()
                await anyio.sleep(0.3)  # several marker checks
        said = [r for r in caplog.records if "refused CONFIG GET" in r.getMessage()]
        assert len(said) == 1
        assert guard.persistence == "unknown"
        assert REGISTRY.get_sample_value("dualwrite_redis_persistence") == -1

    async def test_demo_warns_but_never_refuses(self, private_redis, capsys, clean_environment):
        """The demo on an evicting Redis without persistence runs to its report, saying so."""
        server = private_redis(*EVICTING)
        settings = Settings(redis={"url": server.url})
        result = await run_demo(settings, DemoOptions(customers_per_stage=1, events=20))
        assert result.report.customers
        out = capsys.readouterr().out
        assert "redis_persistence_off, redis_evicting (fine for a demo" in out


# ---------------------------------------------------------------------------- data-loss marker


def losses() -> float:
    """Redis data losses this process detected, so far."""
    return REGISTRY.get_sample_value("dualwrite_redis_data_losses_total") or 0.0


async def legacy_line(engine: DualWriteEngine, scenario: Scenario, quantity: int) -> None:
    """One usage event for a legacy customer (its ledger line is at parity once recorded)."""
    assert (await engine.record(usage(scenario, quantity))).accepted


class TestDataLoss:
    """A marker per slot: a process that saw it notices when it is gone, replaced or rolled back."""

    async def test_empty_restart_is_detected_reported_and_remembered(
        self, empty_redis: OwnRedis, standin_url, builder: ScenarioBuilder, caplog
    ):
        """An empty restart: an error, a count, readiness and the report say so (no parity
        anywhere), the markers are made again with the time, and a later process reads it."""
        settings = own_settings(empty_redis, standin_url)
        scenario = await builder.customer()
        proxy = ProxyApp(settings)
        proxy.durability.interval = 0.05
        before = losses()
        await proxy.startup()
        try:
            engine = proxy.engine
            await legacy_line(engine, scenario, 5)
            assert (await proxy.health())[1]["redis_data_lost"] is None
            report = await build_report(engine.ledger, engine.resolver)
            assert [line.status for line in report.customers] == ["parity"]
            seen_ok = time.time()
            with caplog.at_level(logging.ERROR, logger="dualwrite.durability"):
                empty_redis.stop()
                empty_redis.start()
                await eventually(lambda: proxy.durability.lost is not None, within=5, what="loss")
            assert "REDIS LOST DATA" in caplog.text and "dualwrite reconcile" in caplog.text
            assert losses() == before + 1
            lost = proxy.durability.lost
            assert lost is not None and lost.since <= seen_ok <= lost.detected_at
            status, health = await proxy.health()
            assert status == 200 and health["status"] == "degraded"
            assert health["problems"] == ["redis_data_lost"]
            assert health["redis_data_lost"]["since"] == lost.since
            assert "dualwrite reconcile" in health["redis_data_lost"]["action"]
            assert REGISTRY.get_sample_value("dualwrite_redis_data_lost") == 1
            # The ledger now holds only what came after: it looks equal, it is not verified.
            await legacy_line(engine, scenario, 7)
            report = await build_report(engine.ledger, engine.resolver)
            assert report.ledger_incomplete_since == lost.since
            [line] = report.customers
            assert line.status == "unverified" and not line.verdict.ready
            assert "ledger incomplete since" in line.verdict.reason
            assert "ledger incomplete since" in report.redis_warnings[0]
            table = render(report)
            assert "ledger incomplete since" in table
            assert [row for row in table.splitlines() if "cus_" in row and "parity" in row] == []
            # The fact is in Redis: a process started now reads it.
            async with guarding(settings) as later:
                await later.start()
                assert later.lost == lost
        finally:
            await proxy.aclose()

    async def test_a_second_loss_is_detected_and_keeps_the_first_time(
        self, empty_redis: OwnRedis, standin_url
    ):
        """The markers are made again after a loss, so the next loss is seen too; the record
        keeps the earliest time, carried by the process that saw both."""
        settings = own_settings(empty_redis, standin_url)
        async with guarding(settings, interval=0.05) as guard:
            await guard.start()
            empty_redis.stop()
            empty_redis.start()
            await eventually(lambda: guard.detected == 1, within=5, what="the first loss")
            first = guard.lost
            empty_redis.stop()
            empty_redis.start()
            await eventually(lambda: guard.detected == 2, within=5, what="the second loss")
            assert guard.lost == first
            client = open_redis(settings.redis)
            try:
                assert await read_loss(client, KeySpace(settings.redis.key_prefix)) == first
            finally:
                await client.aclose()

    async def test_a_rollback_to_an_older_snapshot_is_detected(
        self, empty_redis: OwnRedis, standin_url
    ):
        """Redis restarted from a snapshot older than what was written (RDB only): the beat went
        back, so data written since the snapshot is gone."""
        settings = own_settings(empty_redis, standin_url)
        async with guarding(settings, interval=0.05) as guard:
            await guard.start()
            client = redis_sync.Redis.from_url(empty_redis.url)
            client.save()  # dump.rdb holds the marker as it is now
            client.close()
            snapshot = time.time()
            await anyio.sleep(0.5)  # later beats, never saved
            empty_redis.stop()  # save '' : nothing is saved at shutdown
            empty_redis.start()  # loads the older dump.rdb
            await eventually(lambda: guard.lost is not None, within=5, what="rollback detected")
            assert guard.lost is not None and guard.lost.since <= snapshot

    async def test_clear_loss_after_reconcile(self, empty_redis: OwnRedis, standin_url):
        """``dualwrite durability --clear-loss`` forgets the loss (audited); processes see it
        at their next check, and the report claims parity again."""
        settings = own_settings(empty_redis, standin_url)
        async with guarding(settings, interval=0.05) as guard:
            await guard.start()
            empty_redis.stop()
            empty_redis.start()
            await eventually(lambda: guard.lost is not None, within=5, what="loss")
            env = {
                "DUALWRITE_REDIS__URL": empty_redis.url,
                "DUALWRITE_REDIS__KEY_PREFIX": settings.redis.key_prefix,
            }
            shown = await anyio.to_thread.run_sync(
                lambda: CliRunner().invoke(app, ["durability", "--json"], env=env)
            )
            assert shown.exit_code == 1 and json.loads(shown.output)["data_lost"] is not None
            rehearsed = await anyio.to_thread.run_sync(
                lambda: CliRunner().invoke(
                    app, ["durability", "--clear-loss", "--dry-run", "--reason", "x"], env=env
                )
            )
            assert rehearsed.exit_code == 1, rehearsed.output
            assert "dry run: would clear the data loss recorded since" in rehearsed.output
            assert "Redis lost data" in rehearsed.output
            still = await anyio.to_thread.run_sync(
                lambda: CliRunner().invoke(app, ["durability", "--json"], env=env)
            )
            assert json.loads(still.output)["data_lost"] is not None  # and nothing was audited
            cleared = await anyio.to_thread.run_sync(
                lambda: CliRunner().invoke(
                    app,
                    ["durability", "--clear-loss", "--actor", "ops", "--reason", "reconciled"],
                    env=env,
                )
            )
            assert cleared.exit_code == 0, cleared.output
            assert "cleared: the data loss recorded since" in cleared.output
            await eventually(lambda: guard.lost is None, within=5, what="the clear seen")
            entries = await anyio.to_thread.run_sync(
                audit_entries, empty_redis.url, settings.redis.key_prefix
            )
            assert [(e.action, e.actor) for e in entries] == [("durability.clear_loss", "ops")]
