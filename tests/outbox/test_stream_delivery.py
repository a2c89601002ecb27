"""Shadow meter events through the v2 stream: batches settled in one round trip, each entry once."""

from __future__ import annotations

import uuid

import anyio
import pytest

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.ledger import LedgerUpdate
from dualwrite.models import Leg, Stage
from dualwrite.outbox import OUTBOX_GROUP, OutboxEntry
from dualwrite.redis_client import open_redis, scan_keys
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, ScenarioBuilder, make_settings, set_stage, usage

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str) -> Settings:
    """Meter events through the v2 stream; no in-process worker (the tests run their own)."""
    return make_settings(
        redis_url=redis_url,
        prefix=key_prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        stripe={"meter_path": "v2"},
        outbox={"run_in_process": False, "batch_size": 100, "concurrency": 4},
    )


async def meter_qty(engine: DualWriteEngine, customer: str) -> tuple[int, int]:
    """(accepted, expected) meter quantity in the ledger."""
    accepted = expected = 0
    for row in await engine.ledger.rows(customer=customer):
        accepted += row["meter_accepted_qty"]
        expected += row["meter_expected_qty"]
    return accepted, expected


async def test_batches_of_shadow_events_are_settled_once_each(engine, standin_url, standin):
    """250 shadow events of three customers go out in stream calls of at most 100, and each is
    counted once in the ledger and once at Stripe; the outbox is left empty."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    customers = [await builder.customer() for _ in range(3)]
    await builder.aclose()
    for scenario in customers:
        await set_stage(engine, scenario.customer, Stage.SHADOW)
    for index in range(250):
        await engine.record(usage(customers[index % 3], index % 5 + 1))
    worker = engine.new_worker()
    with anyio.fail_after(20):
        await worker.drain()
    assert worker.counts["accepted"] == 250
    for number, scenario in enumerate(customers):
        sent = sum(index % 5 + 1 for index in range(number, 250, 3))
        assert standin.meter_total(scenario.customer, EVENT_NAME) == sent
        assert await meter_qty(engine, scenario.customer) == (sent, sent)
    calls = [r for r in standin.requests if r.path == "/v2/billing/meter_event_stream"]
    # A call answered later than the timeout is sent again (Stripe, above, counted each event once).
    assert sum(r.event_count or 0 for r in calls) >= 250
    assert all((r.event_count or 0) <= 100 for r in calls)
    shard = engine.keys.shard(0)
    assert await engine.redis.xlen(shard.outbox) == 0


async def test_settle_many_counts_an_entry_no_longer_pending_once(engine, standin_url):
    """An entry settled twice (a slow worker whose entry was taken over) counts once: the second
    settlement reports False and changes nothing."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    scenario = await builder.customer()
    await builder.aclose()
    await set_stage(engine, scenario.customer, Stage.SHADOW)
    await engine.record(usage(scenario, 7))
    await engine.outbox.ensure_groups()
    [(shard, entry_id, payload)] = await engine.outbox.read("bench", count=10, block_ms=None)
    entry = OutboxEntry.parse(payload)

    def update() -> LedgerUpdate:
        return LedgerUpdate(shard, entry.event, entry.period).shadow_accepted(Leg.METER, 7)

    assert await engine.outbox.settle_many([(shard, entry_id, update())]) == [True]
    assert await engine.outbox.settle_many([(shard, entry_id, update())]) == [False]
    assert await meter_qty(engine, scenario.customer) == (7, 7)
    groups = await engine.redis.xinfo_groups(shard.outbox)
    assert [group["pending"] for group in groups if group["name"] == OUTBOX_GROUP] == [0]


async def test_stream_batches_spanning_cluster_slots(redis_cluster, standin_url, standin):
    """On a Redis Cluster a batch holds entries of several shards (several slots): each is settled
    on its own and counted once, and the outboxes are left empty."""
    prefix = f"dwtest-{uuid.uuid4().hex[:12]}"
    settings = make_settings(
        redis_url=redis_cluster.url,
        prefix=prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        redis={"shards": 3},
        stripe={"meter_path": "v2"},
        outbox={"run_in_process": False},
    )
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    try:
        customers = [await builder.customer() for _ in range(4)]
        async with DualWriteEngine.from_settings(settings) as engine:
            assert len({engine.keys.for_customer(s.customer).shard for s in customers}) > 1
            for scenario in customers:
                await set_stage(engine, scenario.customer, Stage.SHADOW)
            for index in range(40):
                await engine.record(usage(customers[index % 4], 2))
            worker = engine.new_worker()
            with anyio.fail_after(20):
                await worker.drain()
            assert worker.counts["accepted"] == 40
            for scenario in customers:
                assert standin.meter_total(scenario.customer, EVENT_NAME) == 20
                assert await meter_qty(engine, scenario.customer) == (20, 20)
            for shard in engine.keys.all_shards():
                assert await engine.redis.xlen(shard.outbox) == 0
    finally:
        await builder.aclose()
        client = open_redis(settings.redis)
        try:
            for key in await scan_keys(client, f"{prefix}:*"):
                await client.unlink(key)
        finally:
            await client.aclose()
