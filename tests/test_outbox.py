"""The outbox under faults: dead workers, duplicate delivery, unreadable entries, back-off."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.outbox import OUTBOX_GROUP, OutboxEntry, OutboxWorker
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, set_stage, usage

pytestmark = pytest.mark.anyio


@pytest.fixture
async def shadow_customer(engine: DualWriteEngine, standin_url: str) -> AsyncIterator[Scenario]:
    """A customer at the shadow stage."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    scenario = await builder.customer()
    await set_stage(engine, scenario.customer, Stage.SHADOW)
    yield scenario
    await builder.aclose()


async def meter_qty(engine: DualWriteEngine, customer: str) -> tuple[int, int]:
    """(accepted, expected) meter quantity in the ledger."""
    accepted = expected = 0
    for row in await engine.ledger.rows(customer=customer):
        accepted += row["meter_accepted_qty"]
        expected += row["meter_expected_qty"]
    return accepted, expected


class TestDeadWorkers:
    """Entries a dead worker left pending are delivered by the living, once."""

    async def test_entries_of_a_dead_worker_are_claimed(
        self, engine, shadow_customer, standin: StripeStandin
    ):
        """A worker reads a batch and dies; another claims it after the idle time and delivers it."""
        for quantity in (1, 2, 3):
            await engine.record(usage(shadow_customer, quantity))
        await engine.outbox.ensure_groups()
        taken = await engine.outbox.read("doomed-worker", count=10, block_ms=None)
        assert len(taken) == 3  # the "dead" worker holds them pending and never acknowledges
        assert standin.meter_total(shadow_customer.customer, EVENT_NAME) == 0
        survivor = OutboxWorker(engine.outbox, engine.writer, consumer="survivor")
        with anyio.fail_after(10):
            await survivor.drain()
        assert standin.meter_total(shadow_customer.customer, EVENT_NAME) == 6
        assert await meter_qty(engine, shadow_customer.customer) == (6, 6)
        assert survivor.counts["accepted"] == 3


class TestDuplicateDelivery:
    """The same entry delivered twice (a slow worker and a claimer) counts once."""

    async def test_second_settlement_of_one_entry_changes_nothing(
        self, engine, shadow_customer, standin
    ):
        """Two workers deliver the same entry: Stripe dedupes, the ledger counts it once."""
        await engine.record(usage(shadow_customer, 5))
        await engine.outbox.ensure_groups()
        [(shard, entry_id, payload)] = await engine.outbox.read("slow", count=1, block_ms=None)
        slow = OutboxWorker(engine.outbox, engine.writer, consumer="slow")
        fast = OutboxWorker(engine.outbox, engine.writer, consumer="fast")
        results = []
        async with anyio.create_task_group() as group:
            for worker in (slow, fast):

                async def deliver(worker: OutboxWorker = worker) -> None:
                    results.append(await worker.deliver(shard, entry_id, payload))

                group.start_soon(deliver)
        assert sorted(results) == ["accepted", "skipped"]
        assert standin.meter_total(shadow_customer.customer, EVENT_NAME) == 5
        assert len(standin.meter_events(shadow_customer.customer)) == 1
        assert await meter_qty(engine, shadow_customer.customer) == (5, 5)

    async def test_duplicate_entries_for_one_event_reach_stripe_once(
        self, engine, shadow_customer, standin
    ):
        """Even two distinct entries of one event write one meter event (deterministic identifier)."""
        await engine.record(usage(shadow_customer, 4))
        await engine.outbox.ensure_groups()
        [(shard, _, payload)] = await engine.outbox.read("copier", count=1, block_ms=None)
        await engine.redis.xadd(shard.outbox, {"entry": payload})
        with anyio.fail_after(10):
            await OutboxWorker(engine.outbox, engine.writer, consumer="w").drain()
        assert standin.meter_total(shadow_customer.customer, EVENT_NAME) == 4
        assert len(standin.meter_events(shadow_customer.customer)) == 1


class TestBadEntries:
    """Entries that cannot be processed are set aside, not retried forever."""

    async def test_unreadable_entry_is_dead_lettered(self, engine):
        """An entry that is not an OutboxEntry goes to the dead letters as it was."""
        await engine.outbox.ensure_groups()
        shard = engine.keys.shard(0)
        await engine.redis.xadd(shard.outbox, {"entry": "{not json"})
        with anyio.fail_after(10):
            await OutboxWorker(engine.outbox, engine.writer).drain()
        depth = await engine.outbox.depth()
        assert depth.dead == 1 and depth.outstanding == 0
        [(_, fields)] = await engine.redis.xrange(shard.dead)
        assert fields["reason"] == "unreadable" and fields["entry"] == "{not json"


class TestBackoff:
    """Retryable failures wait with growing, jittered delays and honour Retry-After."""

    async def test_retry_waits_in_the_schedule(self, engine, shadow_customer, standin):
        """A 503 parks the entry in the retry set with a due time; when due it is delivered."""
        standin.faults.refuse(path=r"/v1/billing/meter_events", status=503, count=1, message="busy")
        await engine.record(usage(shadow_customer, 2))
        worker = OutboxWorker(engine.outbox, engine.writer, consumer="w")
        await worker.run_once(block_ms=None)
        assert worker.counts["retry"] == 1
        shard = engine.keys.shard(0)
        [(payload, due)] = await engine.redis.zrange(shard.retry, 0, -1, withscores=True)
        assert OutboxEntry.parse(payload).attempt == 1 and due > 0
        with anyio.fail_after(10):
            await worker.drain()
        assert standin.meter_total(shadow_customer.customer, EVENT_NAME) == 2

    async def test_backoff_grows_and_respects_retry_after(self, engine):
        """Delays double up to the cap, stay within [ceiling/2, ceiling], and never undercut Retry-After."""
        worker = OutboxWorker(engine.outbox, engine.writer)
        settings = engine.settings.outbox
        for attempt in range(8):
            ceiling = min(settings.backoff_max, settings.backoff_base * 2**attempt)
            delay = worker._backoff(attempt, None)
            assert ceiling / 2 <= delay <= ceiling
        assert worker._backoff(0, 7.5) == 7.5


async def test_group_is_created_once(engine):
    """ensure_groups is idempotent and creates the consumer group on every shard."""
    await engine.outbox.ensure_groups()
    engine.outbox._groups_ready = False
    await engine.outbox.ensure_groups()
    groups = await engine.redis.xinfo_groups(engine.keys.shard(0).outbox)
    assert [group["name"] for group in groups] == [OUTBOX_GROUP]
