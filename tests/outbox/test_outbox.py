"""The outbox under faults: dead workers, duplicate delivery, unreadable entries, back-off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.exceptions import ResponseError

from dualwrite.engine import DualWriteEngine
from dualwrite.ledger import LedgerUpdate
from dualwrite.models import Leg, Stage
from dualwrite.outbox import OUTBOX_GROUP, OutboxEntry, OutboxWorker
from dualwrite.outbox._store import _Coalesced
from dualwrite.rate_limits import MeterTurn, RateLimitedError, WriteLimits
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


class TestMeterTurnRelease:
    """The settle releases a v1 write's meter turn in its own round trip."""

    async def test_the_turn_is_held_until_the_settle_releases_it(
        self, engine, shadow_customer, standin
    ):
        """Inside ``delivery`` the turn is held; the settle frees it, before the block is left."""
        await engine.record(usage(shadow_customer, 3))
        await engine.outbox.ensure_groups()
        [(shard, entry_id, payload)] = await engine.outbox.read("w", count=1, block_ms=None)
        entry = OutboxEntry.parse(payload)
        other = WriteLimits(engine.redis, engine.keys, engine.settings.limits)
        async with engine.writer.delivery(Leg.METER, entry.event, max_wait=1) as (result, turn):
            assert result.accepted and turn is not None
            assert await engine.redis.get(turn.key) == turn.token
            with pytest.raises(RateLimitedError):
                async with other.meter_turn(entry.event.customer, EVENT_NAME, max_wait=0.02):
                    pass
            update = LedgerUpdate(shard, entry.event, entry.period).shadow_accepted(Leg.METER, 3)
            assert await engine.outbox.settle(shard, entry_id, update, turn=turn)
            assert turn.released and await engine.redis.exists(turn.key) == 0
        assert await meter_qty(engine, shadow_customer.customer) == (3, 3)

    async def test_an_entry_settled_already_still_frees_the_turn(self, engine, shadow_customer):
        """A settle that finds its entry gone changes nothing else, but its holder is done."""
        await engine.record(usage(shadow_customer, 2))
        await engine.outbox.ensure_groups()
        [(shard, entry_id, payload)] = await engine.outbox.read("w", count=1, block_ms=None)
        event = OutboxEntry.parse(payload).event
        update = LedgerUpdate(shard, event, None).shadow_accepted(Leg.METER, 2)
        assert await engine.outbox.settle(shard, entry_id, update)
        limits = engine.writer.limits
        assert limits is not None
        async with limits.meter_turn(event.customer, EVENT_NAME, max_wait=1) as turn:
            assert turn is not None
            again = LedgerUpdate(shard, event, None).shadow_accepted(Leg.METER, 2)
            assert not await engine.outbox.settle(shard, entry_id, again, turn=turn)
            assert turn.released and await engine.redis.exists(turn.key) == 0
        assert await meter_qty(engine, shadow_customer.customer) == (2, 2)

    async def test_another_holders_turn_and_another_slots_turn_are_left_alone(
        self, engine, shadow_customer
    ):
        """A lease now held by someone else, or a key the script cannot touch, is not released."""
        await engine.record(usage(shadow_customer, 1))
        await engine.outbox.ensure_groups()
        [(shard, entry_id, payload)] = await engine.outbox.read("w", count=1, block_ms=None)
        event = OutboxEntry.parse(payload).event
        key = shard.meter_turn(event.customer, EVENT_NAME)
        await engine.redis.set(key, "someone-else", px=5000)
        update = LedgerUpdate(shard, event, None).shadow_accepted(Leg.METER, 1)
        assert await engine.outbox.settle(shard, entry_id, update, turn=MeterTurn(key, "mine"))
        assert await engine.redis.get(key) == "someone-else"
        elsewhere = MeterTurn(f"{engine.keys.prefix}:{{s99}}:turn:cus_x:{EVENT_NAME}", "mine")
        await engine.redis.set(elsewhere.key, "mine", px=5000)
        assert not await engine.outbox.settle(shard, entry_id, update, turn=elsewhere)
        assert not elsewhere.released and await engine.redis.get(elsewhere.key) == "mine"

    async def test_a_drained_outbox_leaves_no_turn_held(self, engine, shadow_customer, standin):
        """Every v1 delivery's turn is gone once the outbox is drained."""
        for quantity in range(1, 6):
            await engine.record(usage(shadow_customer, quantity))
        worker = OutboxWorker(engine.outbox, engine.writer, consumer="w")
        with anyio.fail_after(10):
            await worker.drain()
        assert worker.counts["accepted"] == 5
        assert standin.meter_total(shadow_customer.customer, EVENT_NAME) == 15
        turns = [
            key
            async for key in engine.redis.scan_iter(f"{engine.keys.prefix}:*:turn:*", count=10_000)
        ]
        assert turns == []


class TestCoalescedSettles:
    """Settles asked for together go to Redis in one pipeline, each with its own reply."""

    async def test_runs_of_one_turn_each_get_their_own_reply_or_error(self, engine, key_prefix):
        """Five runs at once: four replies, one script error raised to its own caller only; a
        script Redis does not know yet (NOSCRIPT) is loaded and run."""
        source = (
            f"-- {key_prefix}\nif ARGV[1] == 'bad' then return redis.error_reply('bad run') end\n"
        )
        script = engine.redis.register_script(source + "return KEYS[1] .. ':' .. ARGV[1]")
        assert await engine.redis.script_exists(script.sha) == [False]
        coalesced = _Coalesced(engine.redis, script)
        key = f"{key_prefix}:{{s0}}:probe"
        replies = await asyncio.gather(
            *(coalesced([key], [arg]) for arg in ("a", "b", "bad", "c", "d")),
            return_exceptions=True,
        )
        assert replies[:2] + replies[3:] == [f"{key}:{arg}" for arg in "abcd"]
        assert isinstance(replies[2], ResponseError) and "bad run" in str(replies[2])
        assert await engine.redis.script_exists(script.sha) == [True]

    async def test_concurrent_settles_of_one_entry_count_once(self, engine, shadow_customer):
        """Three settles of one entry in one turn: one applies, the others find it gone."""
        await engine.record(usage(shadow_customer, 4))
        await engine.outbox.ensure_groups()
        [(shard, entry_id, payload)] = await engine.outbox.read("w", count=1, block_ms=None)
        event = OutboxEntry.parse(payload).event
        done = await asyncio.gather(
            *(
                engine.outbox.settle(
                    shard, entry_id, LedgerUpdate(shard, event, None).shadow_accepted(Leg.METER, 4)
                )
                for _ in range(3)
            )
        )
        assert sorted(done) == [False, False, True]
        assert await meter_qty(engine, shadow_customer.customer) == (4, 4)


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
