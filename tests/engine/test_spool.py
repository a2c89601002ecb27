"""Redis going away: commits wait in the local spool and arrive once, marked delayed."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from dualwrite.commit import Commit, CommitWriter
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage, UsageEvent, WriteResult
from dualwrite.spool import Spool
from tests.conftest import STRIPE_KEY, OwnRedis
from tests.support import EVENT_NAME, ScenarioBuilder, make_settings, set_stage, usage

pytestmark = pytest.mark.anyio


async def ledger_totals(engine: DualWriteEngine, customer: str) -> dict[str, int]:
    """Summed ledger counters of one customer."""
    totals: dict[str, int] = {}
    for row in await engine.ledger.rows(customer=customer):
        for name, value in row.counters.items():
            totals[name] = totals.get(name, 0) + value
    return totals


class TestSpoolFile:
    """The spool file itself: durable appends, exactly-once replay."""

    async def test_replay_applies_each_commit_once(self, redis_client, key_prefix, tmp_path: Path):
        """Replaying twice (a crash mid-replay) applies a commit once."""
        commit = Commit(
            prefix=key_prefix,
            shard=0,
            ledger_key=f"{key_prefix}:{{s0}}:ledger:2026-11-25:cus_1:api",
            index_member="2026-11-25|cus_1|api",
            index_score=20417,
            increments={"events": 1, "quantity": 5},
        )
        spool = Spool(tmp_path / "spool")
        await spool.append(commit)
        assert spool.pending() == 1
        writer = CommitWriter(redis_client, divergence_maxlen=1000)
        assert await spool.replay(writer) == 1
        assert spool.pending() == 0
        await spool.append(commit)  # the same commit again, as after a crash before unlinking
        assert await spool.replay(writer) == 0
        counters = await redis_client.hgetall(commit.ledger_key)
        assert counters == {"events": "1", "quantity": "5", "delayed_events": "1"}

    async def test_a_half_replayed_file_is_never_overwritten(
        self, redis_client, key_prefix, tmp_path
    ):
        """A replay cut off by Redis leaves its file; commits spooled after it survive the next claim."""
        import redis.asyncio as aioredis

        spool = Spool(tmp_path / "spool")
        first, second = (
            Commit(
                prefix=key_prefix,
                shard=0,
                ledger_key=f"{key_prefix}:{{s0}}:ledger:2026-11-25:cus_{name}:api",
                index_member=f"2026-11-25|cus_{name}|api",
                index_score=20417,
                increments={"events": 1},
            )
            for name in ("a", "b")
        )
        await spool.append(first)
        dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.1)
        try:
            assert await spool.replay(CommitWriter(dead, divergence_maxlen=1000)) == 0
        finally:
            await dead.aclose()
        await spool.append(second)  # a fresh file under the same name as the one being replayed
        assert spool.pending() == 2
        assert await spool.replay(CommitWriter(redis_client, divergence_maxlen=1000)) == 2
        for commit in (first, second):
            assert await redis_client.hget(commit.ledger_key, "events") == "1"

    async def test_unreadable_lines_are_skipped(self, redis_client, tmp_path: Path):
        """A torn or foreign line does not stop the replay of the others."""
        spool = Spool(tmp_path / "spool")
        spool.directory.mkdir(parents=True)
        (spool.directory / "spool-other.jsonl").write_text("{torn\n")
        writer = CommitWriter(redis_client, divergence_maxlen=1000)
        assert await spool.replay(writer) == 0
        assert spool.pending() == 0


class TestRedisRestart:
    """A Redis restart during traffic loses nothing and doubles nothing."""

    async def test_shadow_written_while_redis_was_down_arrives_after(
        self, own_redis: OwnRedis, standin_url, standin, tmp_path: Path
    ):
        """A shadow customer's usage recorded during the outage is spooled, replayed, delivered."""
        settings = make_settings(
            redis_url=own_redis.url,
            prefix="dwtest-restart",
            api_base=standin_url,
            api_key=STRIPE_KEY,
            redis={"socket_timeout": 0.3, "connect_timeout": 0.3},
            flags={"cache_ttl": 600},
            outbox={"spool_dir": str(tmp_path / "spool"), "spool_replay_seconds": 0.1},
        )
        builder = ScenarioBuilder(standin_url, STRIPE_KEY)
        scenario = await builder.customer()
        await builder.aclose()
        async with DualWriteEngine.from_settings(settings) as engine:
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            assert (await engine.record(usage(scenario, 3))).shadow_status == "enqueued"

            async def write_then_lose_redis(event: UsageEvent) -> WriteResult:
                result = await engine.writer.write_legacy(event)
                own_redis.stop()  # Redis dies while the authoritative write is in flight
                return result

            during = await engine.record(usage(scenario, 4), legacy_write=write_then_lose_redis)
            assert during.accepted and during.shadow_status == "spooled"
            own_redis.start()
            assert engine.spool is not None
            with anyio.fail_after(20):
                while True:  # the engine's replayer runs in the background
                    if engine.spool.pending() == 0:
                        break
                    await anyio.sleep(0.05)
                # Deliver what is left, including an entry whose settlement Redis's restart cut off.
                await engine.new_worker().drain()
            assert standin.legacy_total(scenario.item) == 7
            assert standin.meter_total(scenario.customer, EVENT_NAME) == 7
            totals = await ledger_totals(engine, scenario.customer)
            assert totals["events"] == 2 and totals["delayed_events"] == 1
            assert totals["meter_accepted_qty"] == 7 and totals["legacy_accepted_qty"] == 7

    async def test_outbox_survives_a_restart_with_persistence(
        self, own_redis: OwnRedis, standin_url, standin, tmp_path: Path
    ):
        """Entries queued before a restart (appendonly on) are all delivered after it."""
        settings = make_settings(
            redis_url=own_redis.url,
            prefix="dwtest-restart2",
            api_base=standin_url,
            api_key=STRIPE_KEY,
            outbox={"spool_dir": str(tmp_path / "spool")},
        )
        builder = ScenarioBuilder(standin_url, STRIPE_KEY)
        scenario = await builder.customer()
        await builder.aclose()
        async with DualWriteEngine.from_settings(settings) as engine:
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            for quantity in range(1, 21):
                await engine.record(usage(scenario, quantity))
        own_redis.stop()
        own_redis.start()
        async with DualWriteEngine.from_settings(settings) as engine:
            with anyio.fail_after(20):
                await engine.new_worker().drain()
            assert standin.meter_total(scenario.customer, EVENT_NAME) == sum(range(1, 21))
            totals = await ledger_totals(engine, scenario.customer)
            assert totals["meter_accepted_qty"] == totals["legacy_accepted_qty"] == 210
