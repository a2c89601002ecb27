"""Each deduplication layer proven on its own: a test per layer that fails when that layer alone is
removed, whatever the other layers do.

1. The caller's ``Idempotency-Key`` claim: a retry is written as first intercepted (or answered
   from the stored outcome), so it never reaches Stripe with other parameters under the same key.
2. The per-leg Stripe ``Idempotency-Key``: a write whose reply was lost is replayed by Stripe.
3. The meter event ``identifier``: Stripe counts it once even when the Idempotency-Key cannot help
   (the v2 stream has none; a resend after ``meter_path`` changed goes another way).
4. The outbox's XACK guard: an entry delivered by two workers is settled in the ledger once.
5. The commit marker: a commit Redis applied but whose reply was lost, sent again, counts once.

Every test goes through ``engine.record()`` and the outbox worker against the stand-in over HTTP,
and ends with the oracle (``tests/oracle.py``): Stripe's summaries and the ledger hold what the
callers were told, at the stage the test set.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage, UsageEvent
from dualwrite.outbox import OutboxWorker
from dualwrite.testing import StripeStandin
from tests.conftest import SettingsFactory

# The ``relay`` fixture: a relay to the test Redis dropping the reply to the first commit script.
from tests.engine.test_commit_retry import relay as commit_relay  # noqa: F401
from tests.oracle import Oracle
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, set_stage, usage

pytestmark = pytest.mark.anyio

METER_PATH = "/v1/billing/meter_events"
STREAM_PATH = "/v2/billing/meter_event_stream"
#: The writers give up on Stripe after this; the stand-in holds a "lost" reply longer.
CLIENT_TIMEOUT = 1.0
HELD_REPLY = 3.0


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """One try per request (a lost reply reaches the caller) and a short Stripe timeout."""
    return standin_settings(stripe={"timeout": CLIENT_TIMEOUT, "request_retries": 0})


def lose_replies(standin: StripeStandin, path: str) -> None:
    """Stripe executes every call under ``path`` but the reply never arrives in time."""
    standin.faults.configure(rate=1.0, kinds=["timeout"], paths=[path], timeout_seconds=HELD_REPLY)


@asynccontextmanager
async def engine_on(settings: Settings) -> AsyncIterator[DualWriteEngine]:
    """An engine on other settings than the test's, without a background worker."""
    engine = DualWriteEngine.from_settings(settings)
    await engine.start(worker=False)
    try:
        yield engine
    finally:
        await engine.aclose()


async def drain(engine: DualWriteEngine, *, consumer: str = "drain") -> OutboxWorker:
    """Deliver every shadow write (retries included)."""
    worker = OutboxWorker(engine.outbox, engine.writer, consumer=consumer)
    with anyio.fail_after(20):
        await worker.drain()
    return worker


async def staged(engine: DualWriteEngine, scenario: Scenario, stage: Stage) -> Oracle:
    """Put the customer at ``stage`` and start an oracle that knows it."""
    await set_stage(engine, scenario.customer, stage)
    oracle = Oracle()
    oracle.set_stage(scenario, stage)
    return oracle


async def accepted(
    engine: DualWriteEngine, oracle: Oracle, scenario: Scenario, quantity: int, identifier: str
) -> None:
    """Record usage (sent now) through the engine, check it was accepted, tell the oracle."""
    sent_at = int(time.time())
    event = usage(scenario, quantity, identifier=identifier, timestamp=sent_at)
    outcome = await engine.record(event)
    assert outcome.accepted, outcome.authoritative.failure
    oracle.tell(scenario, quantity, timestamp=sent_at, accepted=True)


def caller_event(scenario: Scenario, quantity: int, key: str, *, at: int) -> UsageEvent:
    """Usage with the caller's Idempotency-Key, its timestamp ``now`` fixed at intercept ``at``."""
    return usage(scenario, quantity, identifier=key, timestamp=at).model_copy(
        update={"timestamp_source": "intercept"}
    )


def usage_records_path(scenario: Scenario) -> str:
    """The item's usage-record endpoint (not its other reads: the billing period lookup)."""
    return f"/v1/subscription_items/{scenario.item}/usage_records"


def posts(standin: StripeStandin, path: str) -> int:
    """How many POSTs under ``path`` Stripe received (executed or replayed)."""
    return sum(1 for r in standin.requests if r.method == "POST" and r.path.startswith(path))


async def check(oracle: Oracle, engine: DualWriteEngine, builder: ScenarioBuilder) -> None:
    """Stripe's summaries and every ledger row hold what the callers were told."""
    await oracle.assert_stripe(builder.client)
    await oracle.assert_ledger(engine.ledger)


class TestCallerClaim:
    """Layer 1: the caller's Idempotency-Key claim."""

    async def test_a_retry_after_success_is_answered_from_the_claim(self, engine, builder, standin):
        """The caller's retry (intercepted later) gets the first outcome, replayed, and Stripe is
        not called again: no second write under the same Stripe key with another timestamp."""
        scenario = await builder.customer()
        oracle = await staged(engine, scenario, Stage.SHADOW)
        first_at = int(time.time())
        first = await engine.record(caller_event(scenario, 6, "claim-done", at=first_at))
        assert first.accepted
        oracle.tell(scenario, 6, timestamp=first_at, accepted=True)
        await anyio.sleep(1.1)  # the retry is intercepted a second later: its "now" differs
        retry = await engine.record(caller_event(scenario, 6, "claim-done", at=int(time.time())))
        assert retry.accepted and retry.replayed
        assert retry.event.timestamp == first_at and retry.authoritative == first.authoritative
        assert posts(standin, usage_records_path(scenario)) == 1
        await drain(engine)
        await check(oracle, engine, builder)

    async def test_a_retry_after_a_lost_reply_writes_the_first_intercept(
        self, engine, builder, standin
    ):
        """Stripe took the write but the caller heard nothing; its retry (intercepted later) is
        written as first intercepted, so Stripe replays it: told accepted, counted once."""
        scenario = await builder.customer()
        oracle = await staged(engine, scenario, Stage.SHADOW)
        first_at = int(time.time())
        lose_replies(standin, usage_records_path(scenario))
        lost = await engine.record(caller_event(scenario, 9, "claim-lost", at=first_at))
        assert not lost.accepted and lost.authoritative.failure is not None
        assert lost.authoritative.failure.retryable
        oracle.tell(scenario, 9, timestamp=first_at, accepted=False)
        standin.faults.clear()
        await anyio.sleep(1.1)  # the retry is intercepted a second later: its "now" differs
        retry = await engine.record(caller_event(scenario, 9, "claim-lost", at=int(time.time())))
        assert retry.accepted, retry.authoritative.failure
        assert retry.event.timestamp == first_at
        oracle.tell(scenario, 9, timestamp=first_at, accepted=True)
        [record] = standin.usage_records(scenario.item)
        assert (record["quantity"], record["timestamp"]) == (9, first_at)
        await drain(engine)
        await check(oracle, engine, builder)


class TestStripeIdempotencyKeys:
    """Layer 2: each leg's own Stripe Idempotency-Key."""

    @pytest.mark.parametrize("stage", [Stage.SHADOW, Stage.METER], ids=["legacy", "meter"])
    async def test_a_write_whose_reply_was_lost_is_replayed_by_stripe(
        self, stage, engine, builder, standin
    ):
        """The authoritative write reached Stripe, its reply did not; the retry (same event, same
        key) is Stripe's replay: told accepted, one usage record or meter event."""
        scenario = await builder.customer()
        oracle = await staged(engine, scenario, stage)
        sent_at = int(time.time())
        event = usage(scenario, 4, identifier="stripe-key", timestamp=sent_at)
        lose_replies(standin, usage_records_path(scenario) if stage is Stage.SHADOW else METER_PATH)
        lost = await engine.record(event)
        assert not lost.accepted
        oracle.tell(scenario, 4, timestamp=sent_at, accepted=False)
        standin.faults.clear()
        retry = await engine.record(event)
        assert retry.accepted, retry.authoritative.failure
        oracle.tell(scenario, 4, timestamp=sent_at, accepted=True)
        replays = [r for r in standin.requests if r.replayed and r.method == "POST"]
        assert len(replays) == 1  # the retry got Stripe's saved reply
        await drain(engine)
        assert len(standin.usage_records(scenario.item)) == (1 if stage is Stage.SHADOW else 0)
        assert len(standin.meter_events(scenario.customer)) == 1
        await check(oracle, engine, builder)


class TestMeterIdentifier:
    """Layer 3: the meter event's deterministic identifier."""

    async def test_a_stream_batch_resent_after_a_lost_reply_counts_once(
        self, standin_settings, builder, standin
    ):
        """The v2 stream has no Idempotency-Key: a batch whose reply was lost is sent again, and
        only the identifiers keep Stripe from counting it twice."""
        settings = standin_settings(stripe={"timeout": CLIENT_TIMEOUT, "meter_path": "v2"})
        scenario = await builder.customer()
        async with engine_on(settings) as engine:
            oracle = await staged(engine, scenario, Stage.SHADOW)
            for index, quantity in enumerate((3, 5)):
                await accepted(engine, oracle, scenario, quantity, f"stream-{index}")
            lose_replies(standin, STREAM_PATH)
            worker = engine.new_worker(consumer="streamer")
            with anyio.fail_after(10):
                await worker.run_once()  # the stream call times out: both entries retry later
            assert (
                worker.counts["retry"] == 2
                and standin.meter_total(scenario.customer, EVENT_NAME) == 8
            )
            standin.faults.clear()
            with anyio.fail_after(20):
                await worker.drain()
            assert posts(standin, STREAM_PATH) >= 2  # the batch went out again
            await check(oracle, engine, builder)

    async def test_a_v1_send_resent_on_the_stream_after_a_deploy_counts_once(
        self, engine, standin_settings, builder, standin
    ):
        """A v1 meter event's reply was lost; before its retry a deploy moved ``meter_path`` to
        the v2 stream, which carries no Idempotency-Key: the identifier dedupes it."""
        scenario = await builder.customer()
        oracle = await staged(engine, scenario, Stage.SHADOW)
        await accepted(engine, oracle, scenario, 7, "deploy")
        lose_replies(standin, METER_PATH)
        worker = OutboxWorker(engine.outbox, engine.writer, consumer="v1")
        with anyio.fail_after(10):
            await worker.run_once()
        assert (
            worker.counts["retry"] == 1 and standin.meter_total(scenario.customer, EVENT_NAME) == 7
        )
        standin.faults.clear()
        settings = standin_settings(stripe={"timeout": CLIENT_TIMEOUT, "meter_path": "v2"})
        async with engine_on(settings) as deployed:
            await drain(deployed, consumer="v2")
        assert posts(standin, STREAM_PATH) == 1
        await check(oracle, engine, builder)


class TestXackGuard:
    """Layer 4: the settle acknowledges the entry before it counts it."""

    async def test_an_entry_delivered_by_two_workers_is_counted_once(
        self, engine, builder, standin
    ):
        """A worker stalls holding an entry; another claims it after the idle time and delivers
        it; the first then delivers it too. Stripe dedupes the write; the ledger counts it once."""
        scenario = await builder.customer()
        oracle = await staged(engine, scenario, Stage.SHADOW)
        await accepted(engine, oracle, scenario, 5, "xack")
        await engine.outbox.ensure_groups()
        [(shard, entry_id, payload)] = await engine.outbox.read("stalled", count=1, block_ms=None)
        claimer = OutboxWorker(engine.outbox, engine.writer, consumer="claimer")
        with anyio.fail_after(10):
            while claimer.counts["accepted"] == 0:  # claims it once it has been idle long enough
                await claimer.run_once()
                await anyio.sleep(0.05)
        stalled = OutboxWorker(engine.outbox, engine.writer, consumer="stalled")
        assert await stalled.deliver(shard, entry_id, payload) == "skipped"
        assert len(standin.meter_events(scenario.customer)) == 1
        await check(oracle, engine, builder)


class TestCommitMarker:
    """Layer 5: the marker that makes a commit apply once."""

    async def test_a_commit_resent_after_a_lost_reply_counts_once(
        self,
        commit_relay,  # noqa: F811 (the imported fixture)
        standin_settings,
        builder,
        standin,
    ):
        """Usage without a caller key (nothing but the marker guards its commit): Redis applied
        the commit, the reply was lost, the client sent it again; one ledger count, one shadow."""
        relay = commit_relay
        settings = standin_settings(redis={"url": relay.url})
        scenario = await builder.customer()
        async with engine_on(settings) as engine:
            oracle = await staged(engine, scenario, Stage.SHADOW)
            sent_at = int(time.time())
            outcome = await engine.record(usage(scenario, 8, timestamp=sent_at))
            assert relay.dropped == 1, "the relay never saw the commit script"
            assert outcome.accepted and outcome.shadow_status == "enqueued"
            oracle.tell(scenario, 8, timestamp=sent_at, accepted=True)
            await drain(engine)
            await check(oracle, engine, builder)
