"""The record a committed caller-keyed event keeps for its retries (issue 20): a digest of the
usage and a compact outcome, from which the retry's reply is rebuilt byte for byte."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dualwrite import _remembered as remembered
from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import (
    Leg,
    RecordOutcome,
    Stage,
    StripeFailure,
    UsageEvent,
    WriteResult,
)
from dualwrite.proxy import serve_proxy
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.proxy.test_proxy import AUTH, proxy_settings, usage_path
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, make_settings, set_stage

pytestmark = pytest.mark.anyio

EVENT = UsageEvent(
    identifier="retry-7",
    customer="cus_Abc123",
    event_name="api_calls",
    subscription_item="si_Item42",
    quantity=4,
    timestamp=1_765_152_000,
    identifier_source="idempotency_key",
    timestamp_source="intercept",
)


def usage_record(event: UsageEvent, *, livemode: bool = False) -> dict[str, object]:
    """Stripe's usage record for ``event``."""
    return {
        "id": "mbur_1QaZ2bX3cY4dW5eV6fU7gT8h",
        "object": "usage_record",
        "livemode": livemode,
        "quantity": event.quantity,
        "subscription_item": event.subscription_item,
        "timestamp": event.timestamp,
    }


def meter_event(event: UsageEvent, payload: dict[str, str]) -> dict[str, object]:
    """Stripe's meter event for ``event``."""
    return {
        "object": "billing.meter_event",
        "created": 1_765_152_003,
        "event_name": event.event_name,
        "identifier": event.meter_identifier,
        "livemode": False,
        "payload": payload,
        "timestamp": event.timestamp,
    }


def legacy_outcome(event: UsageEvent = EVENT, **changes: object) -> RecordOutcome:
    """A shadow-stage outcome whose legacy write Stripe accepted."""
    result = WriteResult(
        leg=Leg.LEGACY,
        accepted=True,
        stripe_id="mbur_1QaZ2bX3cY4dW5eV6fU7gT8h",
        http_status=200,
        response=usage_record(event),
        value=event.quantity,
    )
    outcome = RecordOutcome(
        event=event,
        stage=Stage.SHADOW,
        authoritative=result,
        shadow_leg=Leg.METER,
        shadow_status="enqueued",
    )
    return outcome.model_copy(update=changes)


def meter_outcome(payload: dict[str, str], event: UsageEvent = EVENT) -> RecordOutcome:
    """A meter-stage outcome whose meter event Stripe accepted."""
    result = WriteResult(
        leg=Leg.METER,
        accepted=True,
        stripe_id=event.meter_identifier,
        http_status=200,
        response=meter_event(event, payload),
        value=event.quantity,
    )
    return RecordOutcome(
        event=event,
        stage=Stage.METER,
        authoritative=result,
        shadow_leg=None,
        shadow_status="not_applicable",
    )


REQUEST_TIMESTAMP = EVENT.model_copy(update={"timestamp_source": "request"})
DEFAULT_PAYLOAD = {"stripe_customer_id": EVENT.customer, "value": "4"}
OUTCOMES = {
    "usage record": legacy_outcome(),
    "usage record, livemode": legacy_outcome().model_copy(
        update={
            "authoritative": legacy_outcome().authoritative.model_copy(
                update={"response": usage_record(EVENT, livemode=True)}
            )
        }
    ),
    "caller's timestamp": legacy_outcome(REQUEST_TIMESTAMP),
    "translated set": legacy_outcome(
        translated=True,
        authoritative=legacy_outcome().authoritative.model_copy(update={"value": 9}),
    ),
    "meter event": meter_outcome(DEFAULT_PAYLOAD),
    "meter event, other payload keys": meter_outcome({"customer": EVENT.customer, "n": "4"}),
    "unusual response": legacy_outcome(
        authoritative=legacy_outcome().authoritative.model_copy(
            update={"response": {"id": "x", "object": "usage_record", "note": "ünïcode|pipe"}}
        )
    ),
    "an id with a pipe": legacy_outcome(
        authoritative=legacy_outcome().authoritative.model_copy(update={"stripe_id": "a|b"})
    ),
    "replayed": legacy_outcome(replayed=True),
    "refused without an HTTP status": RecordOutcome(
        event=EVENT,
        stage=Stage.LEGACY,
        authoritative=WriteResult(
            leg=Leg.LEGACY,
            accepted=False,
            failure=StripeFailure(message="Stripe could not be reached"),
        ),
        shadow_leg=None,
        shadow_status="not_applicable",
    ),
    "refused": RecordOutcome(
        event=EVENT,
        stage=Stage.PRIMARY,
        authoritative=WriteResult(
            leg=Leg.METER,
            accepted=False,
            http_status=400,
            failure=StripeFailure(
                http_status=400, code="resource_missing", message="No such meter", request_id="r1"
            ),
        ),
        shadow_leg=Leg.LEGACY,
        shadow_status="skipped",
    ),
}


class TestCompactRecord:
    """The compact record holds every outcome whole, the event coming from the retry."""

    @pytest.mark.parametrize("name", list(OUTCOMES))
    def test_round_trip(self, name):
        """decode(encode(outcome), the retry's event) is the outcome, field for field."""
        outcome = OUTCOMES[name]
        retry = outcome.event.model_copy(
            update={"timestamp": outcome.event.timestamp + 7}
            if outcome.event.timestamp_source == "intercept"
            else {}
        )
        record = remembered.encode(outcome)
        assert remembered.matches(record, retry)
        rebuilt = remembered.decode(record, retry)
        assert rebuilt == outcome
        assert rebuilt.model_dump_json() == outcome.model_dump_json()

    @pytest.mark.parametrize("name", ["usage record", "meter event", "translated set"])
    def test_small(self, name):
        """The common outcomes take well under 100 characters (the JSON took ~680)."""
        assert len(remembered.encode(OUTCOMES[name])) < 100

    def test_other_usage_does_not_match(self):
        """A record does not match an event with other usage under the same identifier."""
        record = remembered.encode(legacy_outcome())
        assert not remembered.matches(record, EVENT.model_copy(update={"quantity": 5}))

    def test_old_json_still_reads(self):
        """A record in the old format (the whole outcome as JSON) reads and matches by digest."""
        outcome = legacy_outcome()
        record = outcome.model_dump_json()
        assert remembered.matches(record, EVENT)
        assert not remembered.matches(record, EVENT.model_copy(update={"quantity": 5}))
        assert remembered.decode(record, EVENT) == outcome

    def test_unknown_format_is_refused(self):
        """A record in a format this version does not know is a ValueError, not a guess."""
        with pytest.raises(ValueError, match="unknown idempotency record format"):
            remembered.decode("9abc", EVENT)


# ---------------------------------------------------------------- through the engine and Redis


@pytest.fixture
async def scenario(builder: ScenarioBuilder) -> Scenario:
    """A customer on the legacy metered price."""
    return await builder.customer()


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str, scenario: Scenario) -> Settings:
    """Proxy settings whose meter maps the scenario's legacy price."""
    return proxy_settings(redis_url, key_prefix, standin_url, legacy_price=scenario.legacy_price)


def caller_event(scenario: Scenario, key: str, quantity: int = 3) -> UsageEvent:
    """A caller-keyed event for the scenario's item, its timestamp fixed at intercept."""
    return UsageEvent(
        identifier=key,
        customer=scenario.customer,
        event_name=EVENT_NAME,
        subscription_item=scenario.item,
        quantity=quantity,
        timestamp=1_765_152_000,
        identifier_source="idempotency_key",
        timestamp_source="intercept",
    )


class TestInRedis:
    """What the engine leaves in Redis, and reads back."""

    @pytest.mark.parametrize("stage", list(Stage))
    async def test_record_is_one_small_string(self, stage, engine, scenario):
        """A committed caller-keyed event leaves one string of at most 200 bytes (MEMORY USAGE),
        expiring after idempotency_ttl_seconds."""
        await set_stage(engine, scenario.customer, stage)
        event = caller_event(scenario, f"small-{stage.value}")
        await engine.record(event)
        key = engine.keys.for_customer(event.customer).idempotency(event.identifier)
        assert await engine.redis.type(key) == "string"
        assert await engine.redis.memory_usage(key) <= 200
        ttl = await engine.redis.ttl(key)
        assert 0 < ttl <= engine.settings.ledger.idempotency_ttl_seconds

    async def test_retry_gets_the_first_outcome(self, engine, scenario):
        """A retry (later "now") gets the first outcome, with the first instant, replayed."""
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        first = await engine.record(caller_event(scenario, "again-1"))
        later = caller_event(scenario, "again-1").model_copy(update={"timestamp": 1_765_152_060})
        retry = await engine.record(later)
        assert retry == first.model_copy(update={"replayed": True})

    async def test_old_format_record_is_read_and_upgraded(self, engine, scenario):
        """A committed record of the old format (a hash holding the JSON outcome) gives its outcome
        to a retry, and is rewritten in the compact form with its time to live kept."""
        event = caller_event(scenario, "old-1")
        outcome = legacy_outcome(event)
        key = engine.keys.for_customer(event.customer).idempotency(event.identifier)
        await engine.redis.hset(
            key,
            mapping={
                "fp": event.fingerprint(),
                "state": "done",
                "outcome": outcome.model_dump_json(),
            },
        )
        await engine.redis.expire(key, 5000)
        retry = await engine.record(event)
        assert retry == outcome.model_copy(update={"replayed": True})
        assert await engine.redis.type(key) == "string"
        assert 4900 < await engine.redis.ttl(key) <= 5000
        assert remembered.decode(await engine.redis.get(key), event) == outcome
        again = await engine.record(event)  # read again, now from the compact record
        assert again == retry

    async def test_old_format_record_with_other_usage_is_refused(self, engine, scenario):
        """An old-format record still refuses its identifier reused for other usage."""
        event = caller_event(scenario, "old-2")
        key = engine.keys.for_customer(event.customer).idempotency(event.identifier)
        await engine.redis.hset(
            key,
            mapping={
                "fp": event.fingerprint(),
                "state": "done",
                "outcome": legacy_outcome(event).model_dump_json(),
            },
        )
        from dualwrite.exceptions import IdempotencyError

        with pytest.raises(IdempotencyError):
            await engine.record(event.model_copy(update={"quantity": 8}))


# ---------------------------------------------------------------- the caller's replies, byte for byte


class TestProxyReplies:
    """Through the proxy, a retried Idempotency-Key gets the first reply's status and bytes."""

    @pytest.mark.parametrize("stage", list(Stage))
    async def test_accepted(self, stage, settings, engine, scenario):
        """An accepted usage record: the retry's body is the first one's, byte for byte."""
        await set_stage(engine, scenario.customer, stage)
        headers = {**AUTH, "Idempotency-Key": f"bytes-{stage.value}"}
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, headers=headers) as client:
                first = await client.post(usage_path(scenario), data={"quantity": "5"})
                retry = await client.post(usage_path(scenario), data={"quantity": "5"})
        assert first.status_code == retry.status_code == 200
        assert retry.content == first.content
        assert retry.headers["Idempotent-Replayed"] == "true"

    @pytest.mark.parametrize("stage", [Stage.LEGACY, Stage.METER])
    async def test_refused(self, stage, settings, engine, scenario, standin: StripeStandin):
        """Stripe refused the authoritative write: the retry gets the same status and bytes."""
        await set_stage(engine, scenario.customer, stage)
        path = r"/v1/billing/meter_events" if stage is Stage.METER else usage_path(scenario)
        standin.faults.refuse(path=path, code="resource_missing", message="No such thing")
        headers = {**AUTH, "Idempotency-Key": f"refused-{stage.value}"}
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, headers=headers) as client:
                first = await client.post(usage_path(scenario), data={"quantity": "5"})
                retry = await client.post(usage_path(scenario), data={"quantity": "5"})
        assert first.status_code == retry.status_code == 400
        assert retry.content == first.content
        assert json.loads(first.content)["error"]["code"] == "resource_missing"


async def outcome_echo(request: Request) -> Response:
    """An app's usage handler replying with everything the middleware told it."""
    outcome: RecordOutcome = request.state.dualwrite
    shown = outcome.model_dump(mode="json", exclude={"replayed"})
    return Response(json.dumps(shown), media_type="application/json")


@pytest.fixture
def middleware_settings(redis_url: str, key_prefix: str, standin_url: str) -> Settings:
    """Settings with one usage route."""
    route = {
        "method": "POST",
        "path": "/usage/{customer}",
        "customer": "path:customer",
        "subscription_item": "json:item",
        "quantity": "json:quantity",
        "event_name": f"const:{EVENT_NAME}",
    }
    return make_settings(
        redis_url=redis_url,
        prefix=key_prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        routes=(route,),
    )


@pytest.fixture
async def app_client(middleware_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on an app behind the middleware."""
    engine = DualWriteEngine.from_settings(middleware_settings)
    await engine.start(worker=False)
    app = Starlette(routes=[Route("/usage/{customer}", outcome_echo, methods=["POST"])])
    transport = httpx.ASGITransport(app=DualWriteMiddleware(app, engine=engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        client.engine = engine  # type: ignore[attr-defined]
        yield client
    await engine.aclose()


class TestMiddlewareReplies:
    """Behind the middleware, a retry's app sees the first outcome; a refusal replies the same."""

    @pytest.mark.parametrize("stage", list(Stage))
    async def test_accepted(self, stage, app_client, scenario):
        """The app's reply from the replayed outcome is the first reply, byte for byte."""
        await set_stage(app_client.engine, scenario.customer, stage)
        body = {"item": scenario.item, "quantity": 6}
        headers = {"Idempotency-Key": f"mw-bytes-{stage.value}"}
        first = await app_client.post(f"/usage/{scenario.customer}", json=body, headers=headers)
        retry = await app_client.post(f"/usage/{scenario.customer}", json=body, headers=headers)
        assert first.status_code == retry.status_code == 200
        assert retry.content == first.content

    async def test_refused(self, app_client, scenario, standin: StripeStandin):
        """A refused write: the retry gets the same status and bytes."""
        standin.faults.refuse(path=usage_path(scenario), code="resource_missing", message="gone")
        body = {"item": scenario.item, "quantity": 6}
        headers = {"Idempotency-Key": "mw-refused"}
        first = await app_client.post(f"/usage/{scenario.customer}", json=body, headers=headers)
        retry = await app_client.post(f"/usage/{scenario.customer}", json=body, headers=headers)
        assert first.status_code == retry.status_code == 400
        assert retry.content == first.content
