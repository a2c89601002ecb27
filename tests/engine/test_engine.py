"""The engine end to end: real Redis, the Stripe stand-in over HTTP, the official SDK in between."""

from __future__ import annotations

import time

import anyio
import pytest

from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import ConflictError, IdempotencyError, UsageInputError
from dualwrite.flags import RedisFlagStore
from dualwrite.models import EventPlan, Leg, Stage
from dualwrite.outbox import OutboxWorker
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, make_settings, set_stage, usage

pytestmark = pytest.mark.anyio


async def drain(engine: DualWriteEngine) -> None:
    """Deliver every shadow write (retries included)."""
    worker = OutboxWorker(engine.outbox, engine.writer)
    with anyio.fail_after(20):
        await worker.drain()


async def ledger_row(engine: DualWriteEngine, customer: str) -> dict[str, int]:
    """The summed ledger counters of one customer."""
    totals: dict[str, int] = {}
    for row in await engine.ledger.rows(customer=customer):
        for name, value in row.counters.items():
            totals[name] = totals.get(name, 0) + value
    return totals


class TestStages:
    """Each stage writes the legs DESIGN.md's table says, and the caller sees the right one."""

    async def test_legacy_writes_usage_records_only(self, engine, builder, standin: StripeStandin):
        """legacy: a usage record, no meter event, nothing in the outbox."""
        scenario = await builder.customer()
        outcome = await engine.record(usage(scenario, 7))
        await drain(engine)
        assert outcome.stage is Stage.LEGACY and outcome.accepted
        assert outcome.authoritative.leg is Leg.LEGACY
        assert outcome.authoritative.stripe_id and outcome.authoritative.stripe_id.startswith(
            "mbur_"
        )
        assert outcome.shadow_status == "not_applicable"
        assert standin.legacy_total(scenario.item) == 7
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 0

    async def test_shadow_writes_meter_event_through_outbox(self, engine, builder, standin):
        """shadow: the usage record now, the meter event once the outbox is drained."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        outcome = await engine.record(usage(scenario, 4))
        assert outcome.authoritative.leg is Leg.LEGACY and outcome.shadow_status == "enqueued"
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 0
        await drain(engine)
        assert standin.legacy_total(scenario.item) == 4
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 4
        row = await ledger_row(engine, scenario.customer)
        assert row["legacy_accepted_qty"] == row["meter_accepted_qty"] == 4
        assert row["meter_expected_qty"] == 4 and row["events"] == 1

    async def test_primary_writes_meter_first_and_legacy_as_shadow(self, engine, builder, standin):
        """primary: the meter event is authoritative, the usage record the shadow."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.PRIMARY)
        outcome = await engine.record(usage(scenario, 9))
        assert outcome.authoritative.leg is Leg.METER and outcome.shadow_leg is Leg.LEGACY
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 9
        assert standin.legacy_total(scenario.item) == 0
        await drain(engine)
        assert standin.legacy_total(scenario.item) == 9

    async def test_meter_writes_meter_events_only(self, engine, builder, standin):
        """meter: only the meter event, and no subscription item is needed."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.METER)
        event = usage(scenario, 3).model_copy(update={"subscription_item": None})
        outcome = await engine.record(event)
        await drain(engine)
        assert outcome.accepted and outcome.shadow_status == "not_applicable"
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 3
        assert standin.legacy_total(scenario.item) == 0

    async def test_both_legs_carry_the_same_instant(self, engine, builder, standin):
        """The usage record and the meter event share the timestamp fixed at intercept."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        stamp = int(time.time())
        assert (await engine.record(usage(scenario, 2, timestamp=stamp))).accepted
        await drain(engine)
        assert [r["timestamp"] for r in standin.usage_records(scenario.item)] == [stamp]
        assert [e["timestamp"] for e in standin.meter_events(scenario.customer)] == [stamp]

    async def test_legacy_leg_needs_a_subscription_item(self, engine, builder, standin):
        """A legacy write without an item is refused as input, and nothing reaches Stripe."""
        scenario = await builder.customer()
        standin.reset_requests()
        event = usage(scenario).model_copy(update={"subscription_item": None})
        with pytest.raises(UsageInputError) as info:
            await engine.record(event)
        assert info.value.param == "subscription_item"
        assert standin.requests == []


class TestIdempotency:
    """The same identifier recorded twice gives one usage on each leg."""

    async def test_retry_with_same_identifier_writes_once(self, engine, builder, standin):
        """A replay returns the stored outcome and writes nothing more, on either leg."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        event = usage(scenario, 6, identifier="order-42")
        first = await engine.record(event)
        again = await engine.record(event)
        await drain(engine)
        third = await engine.record(event)
        await drain(engine)
        assert not first.replayed and again.replayed and third.replayed
        assert again.authoritative.stripe_id == first.authoritative.stripe_id
        assert standin.legacy_total(scenario.item) == 6
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 6
        assert (await ledger_row(engine, scenario.customer))["events"] == 1

    async def test_identifier_reused_for_different_usage_is_refused(self, engine, builder):
        """Another quantity under a used identifier is an IdempotencyError."""
        scenario = await builder.customer()
        await engine.record(usage(scenario, 1, identifier="dup"))
        with pytest.raises(IdempotencyError):
            await engine.record(usage(scenario, 2, identifier="dup"))

    async def test_identifier_in_flight_is_a_conflict(self, engine, builder):
        """While one request holds an identifier, a second gets ConflictError."""
        scenario = await builder.customer()
        event = usage(scenario, 1, identifier="busy")
        shard = engine.keys.for_customer(scenario.customer)
        await engine.idempotency.claim(shard, event, EventPlan.at(Stage.LEGACY), now=time.time())
        with pytest.raises(ConflictError):
            await engine.record(event)

    async def test_refused_write_can_be_retried(self, engine, builder, standin):
        """After retryable refusals outlast the in-request retries, the caller's retry writes once."""
        scenario = await builder.customer()
        standin.faults.refuse(
            path=r"/v1/subscription_items/.*/usage_records", status=500, count=3, message="boom"
        )
        event = usage(scenario, 5, identifier="retry-me")
        first = await engine.record(event)
        second = await engine.record(event)
        assert not first.accepted and first.authoritative.failure.retryable
        assert second.accepted and not second.replayed
        assert standin.legacy_total(scenario.item) == 5

    async def test_transient_failure_is_retried_within_the_request(self, engine, builder, standin):
        """One 503 on the authoritative write is retried in place: the caller sees success."""
        scenario = await builder.customer()
        standin.faults.refuse(
            path=r"/v1/subscription_items/.*/usage_records", status=503, count=1, message="x"
        )
        outcome = await engine.record(usage(scenario, 4))
        assert outcome.accepted and standin.legacy_total(scenario.item) == 4

    async def test_caller_retry_reuses_the_first_instant(self, engine, builder, standin):
        """A retry of a failed "now" event is written with the first attempt's timestamp."""
        scenario = await builder.customer()
        standin.faults.refuse(
            path=r"/v1/subscription_items/.*/usage_records", status=500, count=3, message="x"
        )
        first = usage(scenario, 2, identifier="late-retry").model_copy(
            update={"timestamp_source": "intercept"}
        )
        assert not (await engine.record(first)).accepted
        retry = first.model_copy(update={"timestamp": first.timestamp + 1})
        outcome = await engine.record(retry)
        assert outcome.accepted and outcome.event.timestamp == first.timestamp
        assert [r["timestamp"] for r in standin.usage_records(scenario.item)] == [first.timestamp]

    async def test_timed_out_write_is_replayed_not_doubled(
        self, redis_url, key_prefix, standin_url, builder, standin
    ):
        """A write Stripe applied but whose reply timed out is replayed on retry, counted once."""
        settings = make_settings(
            redis_url=redis_url,
            prefix=key_prefix,
            api_base=standin_url,
            api_key=STRIPE_KEY,
            stripe={"timeout": 0.3, "request_retries": 4, "request_retry_wait": 0.1},
        )
        async with DualWriteEngine.from_settings(settings) as engine:
            scenario = await builder.customer()
            await set_stage(engine, scenario.customer, Stage.METER)
            standin.faults.configure(
                rate=1.0,
                kinds=("timeout",),
                paths=("/v1/billing/meter_events",),
                timeout_seconds=0.5,
            )
            event = usage(scenario, 7, identifier="slow-one")
            outcome = await engine.record(event)
            standin.faults.clear()
            if not outcome.accepted:  # the caller retries with its Idempotency-Key
                outcome = await engine.record(event)
            assert outcome.accepted
            assert standin.meter_total(scenario.customer, EVENT_NAME) == 7
            assert len(standin.meter_events(scenario.customer)) == 1


class TestItemOwnerUnreadable:
    """Usage naming an item Stripe could not read (a 5xx, so its owner is unknown) is refused,
    retryable, before anything is written; the caller's retry writes it once."""

    @pytest.mark.parametrize("stage", [Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY])
    async def test_refused_retryably_and_nothing_written(self, engine, builder, standin, stage):
        """The refusal names the stage's authoritative leg and, if it has one, its shadow (not
        written); nothing reaches Stripe until the caller retries."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, stage)
        standin.faults.refuse(
            path=rf"/v1/subscription_items/{scenario.item}", status=500, message="down"
        )
        event = usage(scenario, 6, identifier="owner-unreadable")
        outcome = await engine.record(event)
        first, shadow = {
            Stage.LEGACY: (Leg.LEGACY, None),
            Stage.SHADOW: (Leg.LEGACY, Leg.METER),
            Stage.PRIMARY: (Leg.METER, Leg.LEGACY),
        }[stage]
        refused = outcome.authoritative
        assert not outcome.accepted and not refused.accepted and refused.leg is first
        assert refused.failure is not None and refused.failure.retryable
        assert refused.http_status == refused.failure.http_status == 500
        assert (outcome.stage, outcome.shadow_leg) == (stage, shadow)
        assert outcome.shadow_status == ("skipped" if shadow else "not_applicable")
        await drain(engine)
        assert standin.legacy_total(scenario.item) == 0
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 0
        standin.faults.clear()
        retry = await engine.record(event)
        await drain(engine)
        assert retry.accepted and not retry.replayed
        assert standin.legacy_total(scenario.item) == 6
        assert standin.meter_total(scenario.customer, EVENT_NAME) == (0 if shadow is None else 6)


class TestShadowFailures:
    """The shadow is written only after the authoritative write, and its failures are divergence."""

    async def test_no_shadow_when_authoritative_write_fails(self, engine, builder, standin):
        """A refused usage record enqueues no meter event."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        standin.faults.refuse(
            path=r"/v1/subscription_items/.*/usage_records", status=400, code="parameter_invalid"
        )
        outcome = await engine.record(usage(scenario, 8))
        await drain(engine)
        assert not outcome.accepted and outcome.shadow_status == "skipped"
        assert outcome.authoritative.failure.http_status == 400
        assert not outcome.authoritative.failure.retryable
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 0
        assert (await engine.outbox.depth()).outstanding == 0
        row = await ledger_row(engine, scenario.customer)
        assert row.get("events", 0) == 0 and row["legacy_refused_events"] == 1

    async def test_shadow_refused_for_good_is_divergence(self, engine, builder, standin):
        """A permanently refused meter event is dead-lettered and logged with both sides' ids."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        standin.faults.refuse(
            path=r"/v1/billing/meter_events",
            status=400,
            code="parameter_invalid",
            message="nope",
        )
        outcome = await engine.record(usage(scenario, 3))
        await drain(engine)
        row = await ledger_row(engine, scenario.customer)
        assert row["meter_failed_qty"] == 3 and row["divergent_events"] == 1
        [record] = await engine.ledger.divergences(customer=scenario.customer)
        assert record.kind == "shadow_refused"
        assert record.legacy.status == "accepted"
        assert record.legacy.stripe_id == outcome.authoritative.stripe_id
        assert record.meter.status == "refused" and "parameter_invalid" in (
            record.meter.error or ""
        )
        assert (await engine.outbox.depth()).dead == 1

    async def test_transient_shadow_failures_are_retried(self, engine, builder, standin):
        """5xx and 429 on the shadow leg are retried with backoff until accepted, once."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        standin.faults.refuse(path=r"/v1/billing/meter_events", status=500, count=2, message="x")
        standin.faults.refuse(path=r"/v1/billing/meter_events", status=429, count=1, message="y")
        await engine.record(usage(scenario, 11))
        await drain(engine)
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 11
        row = await ledger_row(engine, scenario.customer)
        assert row["meter_accepted_qty"] == 11 and row.get("divergent_events", 0) == 0

    async def test_expired_shadow_is_divergence(
        self, redis_url, key_prefix, standin_url, builder, standin
    ):
        """A shadow still failing after max_age is dead-lettered as expired."""
        settings = make_settings(
            redis_url=redis_url,
            prefix=key_prefix,
            api_base=standin_url,
            api_key=STRIPE_KEY,
            outbox={"max_age_seconds": 0.2},
        )
        async with DualWriteEngine.from_settings(settings) as engine:
            scenario = await builder.customer()
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            standin.faults.refuse(path=r"/v1/billing/meter_events", status=503, message="down")
            await engine.record(usage(scenario, 2))
            await drain(engine)
            [record] = await engine.ledger.divergences(customer=scenario.customer)
            assert record.kind == "shadow_expired" and record.meter.status == "expired"

    async def test_retired_legacy_item_is_not_divergence(self, engine, builder, standin):
        """After the item moved to a meter price, a refused legacy shadow counts as retired."""
        scenario = await builder.customer()
        await builder.move_to_meter_price(scenario)
        await set_stage(engine, scenario.customer, Stage.PRIMARY)
        outcome = await engine.record(usage(scenario, 4))
        await drain(engine)
        assert outcome.accepted
        row = await ledger_row(engine, scenario.customer)
        assert row["legacy_retired_qty"] == 4 and row.get("divergent_events", 0) == 0
        assert await engine.ledger.divergences(customer=scenario.customer) == []


class TestSetTranslation:
    """Legacy ``set`` reaches a sum meter as the difference from the last value set."""

    async def test_set_becomes_a_difference(self, engine, builder, standin):
        """set 10 then set 15 at one timestamp: legacy holds 15, the meter 10 + 5."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        stamp = int(time.time())
        first = await engine.record(usage(scenario, 10, action="set", timestamp=stamp))
        await engine.record(usage(scenario, 15, action="set", timestamp=stamp))
        await drain(engine)
        assert first.translated
        assert standin.legacy_total(scenario.item) == 15
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 15
        row = await ledger_row(engine, scenario.customer)
        assert row["translated_events"] == 2 and row["legacy_accepted_qty"] == 15
        kinds = {
            record.kind for record in await engine.ledger.divergences(customer=scenario.customer)
        }
        assert kinds == {"translated"}

    async def test_refuse_policy_rejects_set_on_meter_stages(
        self, redis_url, key_prefix, standin_url, builder
    ):
        """With set_policy = "refuse", a set for a shadow customer is a 400-class input error."""
        from dualwrite.config import MeterMapping

        settings = make_settings(
            redis_url=redis_url, prefix=key_prefix, api_base=standin_url, api_key=STRIPE_KEY
        ).model_copy(update={"meters": (MeterMapping(event_name=EVENT_NAME, set_policy="refuse"),)})
        async with DualWriteEngine.from_settings(settings) as engine:
            scenario = await builder.customer()
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            with pytest.raises(UsageInputError) as info:
                await engine.record(usage(scenario, 1, action="set"))
            assert info.value.param == "action"


class TestRedisDown:
    """Without Redis the request path still works, at the safe stage."""

    async def test_unreachable_redis_resolves_safe_stage_and_still_writes(
        self, standin_url, builder, standin
    ):
        """Redis on a dead port: legacy (safe) write happens, nothing raises."""
        settings = make_settings(
            redis_url="redis://127.0.0.1:1/0",
            prefix="dwtest-down",
            api_base=standin_url,
            api_key=STRIPE_KEY,
            redis={"socket_timeout": 0.2, "connect_timeout": 0.2},
        )
        scenario = await builder.customer()
        async with DualWriteEngine.from_settings(settings) as engine:
            outcome = await engine.record(usage(scenario, 5, identifier="while-down"))
        assert outcome.stage is Stage.LEGACY and outcome.accepted
        assert standin.legacy_total(scenario.item) == 5


class TestFlagChanges:
    """A flag change reaches every engine instance within milliseconds, not after the cache TTL."""

    async def test_second_engine_sees_a_change_through_pubsub(
        self, redis_url, key_prefix, standin_url, builder, standin
    ):
        """Engine B caches legacy; a change made through engine A applies to B's next record."""
        settings = make_settings(
            redis_url=redis_url,
            prefix=key_prefix,
            api_base=standin_url,
            api_key=STRIPE_KEY,
            flags={"cache_ttl": 600},
        )
        scenario = await builder.customer()
        async with (
            DualWriteEngine.from_settings(settings) as first,
            DualWriteEngine.from_settings(settings) as second,
        ):
            assert (await second.record(usage(scenario, 1))).stage is Stage.LEGACY
            store = RedisFlagStore(first.redis, first.keys)
            await store.set_override(scenario.customer, Stage.SHADOW, actor="tests")
            with anyio.fail_after(2):
                while True:  # polls: the point is how soon B's cache lets the change through
                    if await second.resolver.resolve(scenario.customer) is Stage.SHADOW:
                        break
                    await anyio.sleep(0.001)
            assert (await second.record(usage(scenario, 1))).stage is Stage.SHADOW


class TestMeterStream:
    """With meter_path = "v2", meter events go through the v2 stream, on both paths."""

    async def test_primary_customer_through_the_stream(
        self, redis_url, key_prefix, standin_url, builder, standin
    ):
        """The authoritative meter write is a one-event stream call; the shadow legacy follows."""
        settings = make_settings(
            redis_url=redis_url,
            prefix=key_prefix,
            api_base=standin_url,
            api_key=STRIPE_KEY,
            stripe={"meter_path": "v2"},
        )
        async with DualWriteEngine.from_settings(settings) as engine:
            scenario = await builder.customer()
            await set_stage(engine, scenario.customer, Stage.PRIMARY)
            outcome = await engine.record(usage(scenario, 6))
            with anyio.fail_after(10):
                await engine.new_worker().drain()
        assert (
            outcome.accepted and outcome.authoritative.stripe_id == outcome.event.meter_identifier
        )
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 6
        assert standin.legacy_total(scenario.item) == 6
        paths = {request.path for request in standin.requests}
        assert "/v2/billing/meter_event_stream" in paths and "/v1/billing/meter_events" not in paths
