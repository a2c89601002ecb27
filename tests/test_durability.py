"""Redis as a database: a Redis emptied or restarted under running processes (NOGROUP mended, the
worker's state changes logged), the start-up checks of its settings, and the data-loss marker.

Every test that restarts, empties or reconfigures Redis runs its own ``redis-server`` on a free port
(``tests/conftest.py``: ``OwnRedis``); the shared Redis is only ever read and written under the
test's key prefix.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY, OwnRedis
from tests.support import (
    EVENT_NAME,
    ScenarioBuilder,
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
