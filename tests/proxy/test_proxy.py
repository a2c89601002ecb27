"""The proxy end to end: uvicorn on a real socket, the Stripe stand-in as upstream, real Redis, and
the official stripe-python SDK (or plain httpx, to see the wire) as the caller."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
import stripe
import uvicorn
from starlette.types import Receive, Scope, Send

from dualwrite.config import ItemMapping, MeterMapping, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.proxy import HEALTH_PATH, RunningProxy, create_proxy_app, record_id, serve_proxy
from dualwrite.report import build_report, render_table
from dualwrite.testing import StripeStandin, serve_standin
from tests.conftest import STRIPE_KEY
from tests.oracle import Oracle
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    make_settings,
    set_stage,
)

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": f"Bearer {STRIPE_KEY}"}
USAGE_PATHS = r"/v1/subscription_items/[^/]+/usage_records"


def usage_path(scenario: Scenario) -> str:
    """The legacy usage-record endpoint of the scenario's item."""
    return f"/v1/subscription_items/{scenario.item}/usage_records"


def proxy_settings(
    redis_url: str, prefix: str, api_base: str, *, legacy_price: str | None = None, **sections: Any
) -> Settings:
    """Test settings whose meter maps ``legacy_price`` (none: every item is unmapped)."""
    settings = make_settings(
        redis_url=redis_url, prefix=prefix, api_base=api_base, api_key=STRIPE_KEY, **sections
    )
    prices = (legacy_price,) if legacy_price else ()
    meter = MeterMapping(event_name=EVENT_NAME, legacy_prices=prices)
    return settings.model_copy(update={"meters": (meter,)})


async def eventually(check: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """Wait until ``check()`` holds (the in-process outbox worker delivers shadow writes)."""
    with anyio.fail_after(seconds):
        while True:  # polls: the worker runs in the proxy's thread, with nothing to await on
            if check():
                return
            await anyio.sleep(0.02)


def stripe_client(url: str) -> tuple[stripe.StripeClient, stripe.HTTPXClient]:
    """The official SDK pointed at ``url``, as a user's app would be (and its HTTP client)."""
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": url}, http_client=http_client)
    return client, http_client


async def settled(engine: DualWriteEngine) -> None:
    """Wait until the outbox holds nothing ready, pending or scheduled: every shadow write the proxy
    enqueued (before it replied) is settled, so nothing more can reach Stripe."""
    with anyio.fail_after(10):
        while True:
            depth = await engine.outbox.depth()
            if depth.outstanding == 0 and depth.pending == 0:
                return
            await anyio.sleep(0.02)


def told_at(scenario: Scenario, stage: Stage, quantity: int, timestamp: int) -> Oracle:
    """An oracle told that one caller at ``stage`` had ``quantity`` accepted at ``timestamp``."""
    oracle = Oracle()
    oracle.set_stage(scenario, stage)
    oracle.tell(scenario, quantity, timestamp=timestamp, accepted=True)
    return oracle


async def prefix_values(redis_url: str, prefix: str) -> list[str]:
    """Every value stored under ``prefix``, whatever its type, as text."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    values: list[str] = []
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
            kind = await client.type(key)
            if kind == "string":
                values.append(str(await client.get(key)))
            elif kind == "hash":
                values.append(json.dumps(await client.hgetall(key)))
            elif kind == "stream":
                values.append(json.dumps(await client.xrange(key)))
            elif kind == "zset":
                values.append(json.dumps(await client.zrange(key, 0, -1)))
            values.append(key)
    finally:
        await client.aclose()
    return values


@contextmanager
def serve_asgi(app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> Iterator[str]:
    """Serve a small ASGI app with uvicorn in a thread; yields its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="off", log_config=None, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test upstream did not start"
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


GZIPPED = gzip.compress(b'{"object": "customer", "id": "cus_gzip"}', mtime=0)


class Recorder:
    """An upstream that records what reaches it: headers, and body bytes as they arrive."""

    STREAM_BYTES = 8 * 1024 * 1024

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.clients: list[int] = []
        self.received = 0
        self.requests = 0
        self.reader_started = threading.Event()
        self.ack = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        self.clients.append(scope["client"][1])
        path = scope["path"]
        if path == "/v1/slow":
            await asyncio.sleep(1)
        if path == "/v1/pause":
            await asyncio.sleep(0.2)
        if path == "/v1/download":
            await self._download(send)
            return
        if path == "/v1/gzipped":
            await self._gzipped(send)
            return
        digest = hashlib.sha256()
        total = 0
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            total += len(chunk)
            self.received = total
            digest.update(chunk)
            more = message.get("more_body", False)
        body = json.dumps({"received": total, "sha256": digest.hexdigest()}).encode()
        status = 429 if path == "/v1/limited" else 200
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"request-id", b"req_recorded"),
                    (b"stripe-should-retry", b"true"),
                    (b"retry-after", b"2"),
                    (b"keep-alive", b"timeout=5"),
                    (b"x-custom-upstream", b"kept"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _gzipped(self, send: Send) -> None:
        """A gzip-encoded JSON reply, as Stripe sends one to a client that accepts gzip."""
        headers = [(b"content-encoding", b"gzip"), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": GZIPPED})

    async def _download(self, send: Send) -> None:
        """8 MiB in 64 KiB chunks; halfway it waits for the client to say it got the first half."""
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 65536
        half = self.STREAM_BYTES // 2 // len(chunk)
        for index in range(2 * half):
            if index == half:
                acked = await anyio.to_thread.run_sync(self.ack.wait, 5.0)
                if not acked:
                    await send(
                        {"type": "http.response.body", "body": b"NO-ACK", "more_body": False}
                    )
                    return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture
async def scenario(builder: ScenarioBuilder) -> Scenario:
    """A customer on the legacy metered price."""
    return await builder.customer()


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str, scenario: Scenario) -> Settings:
    """Proxy settings whose meter maps the scenario's legacy price."""
    return proxy_settings(redis_url, key_prefix, standin_url, legacy_price=scenario.legacy_price)


@pytest.fixture
def proxy(settings: Settings) -> Iterator[RunningProxy]:
    """The proxy on a real socket, its engine and outbox worker running."""
    with serve_proxy(settings) as running:
        yield running


@pytest.fixture
async def http(proxy: RunningProxy) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client on the proxy, with the test key."""
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=20) as client:
        yield client


@pytest.fixture
async def sdk(proxy: RunningProxy) -> AsyncIterator[stripe.StripeClient]:
    """stripe-python pointed at the proxy."""
    client, http_client = stripe_client(proxy.url)
    yield client
    await http_client.close_async()  # type: ignore[no-untyped-call]


async def post_usage(
    sdk: stripe.StripeClient, scenario: Scenario, quantity: int, key: str | None = None
) -> stripe.StripeResponse:
    """Create a usage record through the SDK, as stripe-python 12+ apps must (raw_request)."""
    options: dict[str, Any] = {"idempotency_key": key} if key else {}
    response: stripe.StripeResponse = await sdk.raw_request_async(
        "post",
        usage_path(scenario),
        quantity=quantity,
        timestamp="now",
        stripe_version=LEGACY_VERSION,
        **options,
    )
    return response


# ------------------------------------------------------------------------------------------- tests


class TestStagesThroughTheSDK:
    """stripe-python, pointed at the proxy, creates usage records for customers at every stage."""

    async def test_each_stage_replies_and_writes_its_legs(self, sdk, engine, builder, standin):
        """legacy/shadow get Stripe's record; primary/meter ours; both legs hold the right totals."""
        customers = {stage: await builder.customer(stage.value) for stage in Stage}
        oracle = Oracle()
        for stage, scenario in customers.items():
            await set_stage(engine, scenario.customer, stage)
            oracle.set_stage(scenario, stage)
        replies = {}
        for stage, scenario in customers.items():
            response = await post_usage(sdk, scenario, 7, key=f"sdk-{stage.value}")
            assert response.code == 200, response.body
            replies[stage] = (json.loads(response.body), response.headers)
            oracle.tell(scenario, 7, timestamp=replies[stage][0]["timestamp"], accepted=True)

        for stage in (Stage.LEGACY, Stage.SHADOW):
            body, headers = replies[stage]
            records = standin.usage_records(customers[stage].item)
            assert body["id"] == records[0]["id"] and not body["id"].startswith("mbur_dw_")
            assert headers["idempotency-key"] == f"sdk-{stage.value}"
            assert headers["original-request"] == headers["request-id"]  # Stripe's own headers
        for stage in (Stage.PRIMARY, Stage.METER):
            body, headers = replies[stage]
            assert body == {
                "id": record_id(f"sdk-{stage.value}"),
                "object": "usage_record",
                "livemode": False,
                "quantity": 7,
                "subscription_item": customers[stage].item,
                "timestamp": body["timestamp"],
            }
            assert isinstance(body["timestamp"], int) and abs(body["timestamp"] - time.time()) < 60
            assert headers["request-id"].startswith("req_dw_")
            obj = sdk.deserialize(body, api_mode="V1")
            assert obj["object"] == "usage_record" and obj["quantity"] == 7

        expected = {
            Stage.LEGACY: (7, 0),
            Stage.SHADOW: (7, 7),
            Stage.PRIMARY: (7, 7),
            Stage.METER: (0, 7),
        }

        def totals() -> dict[Stage, tuple[int, float]]:
            return {
                stage: (
                    standin.legacy_total(scenario.item),
                    standin.meter_total(scenario.customer, EVENT_NAME),
                )
                for stage, scenario in customers.items()
            }

        await eventually(lambda: totals() == expected)
        await settled(engine)  # nothing left to deliver: nothing more can arrive
        assert totals() == expected
        await oracle.assert_stripe(builder.client)
        await oracle.assert_ledger(engine.ledger)

    async def test_meter_leg_carries_the_intercept_instant(self, sdk, engine, scenario, standin):
        """timestamp=now becomes one instant, fixed at intercept, in the reply and the meter event."""
        await set_stage(engine, scenario.customer, Stage.PRIMARY)
        body = json.loads((await post_usage(sdk, scenario, 3, key="ts-1")).body)
        await eventually(lambda: len(standin.usage_records(scenario.item)) == 1)
        [event] = standin.meter_events(scenario.customer)
        [record] = standin.usage_records(scenario.item)
        assert event["timestamp"] == record["timestamp"] == body["timestamp"]


class TestIdempotency:
    """One Idempotency-Key, retried, gives one usage on each leg and the same reply, at every stage."""

    @pytest.mark.parametrize("stage", list(Stage))
    async def test_retries_write_once_and_reply_the_same(
        self, stage, sdk, engine, builder, scenario, standin
    ):
        """Three sends with one key: identical replies, each leg written once."""
        await set_stage(engine, scenario.customer, stage)
        bodies = [
            json.loads((await post_usage(sdk, scenario, 4, key="retry-1")).body) for _ in "abc"
        ]
        assert bodies[0] == bodies[1] == bodies[2]
        legacy = 4 if stage is not Stage.METER else 0
        meter = 4 if stage is not Stage.LEGACY else 0

        def written() -> bool:
            return bool(
                standin.legacy_total(scenario.item) == legacy
                and standin.meter_total(scenario.customer, EVENT_NAME) == meter
            )

        await eventually(written)
        await settled(engine)  # nothing left to deliver: nothing more can arrive
        assert written()
        assert len(standin.usage_records(scenario.item)) == (1 if legacy else 0)
        assert len(standin.meter_events(scenario.customer)) == (1 if meter else 0)
        oracle = told_at(scenario, stage, 4, bodies[0]["timestamp"])
        await oracle.assert_stripe(builder.client)
        await oracle.assert_ledger(engine.ledger)

    async def test_replay_says_so(self, http, engine, scenario):
        """Our own replay carries Idempotent-Replayed, like Stripe's."""
        await set_stage(engine, scenario.customer, Stage.METER)
        headers = {"Idempotency-Key": "replayed-1", "Stripe-Version": LEGACY_VERSION}
        first = await http.post(usage_path(scenario), data={"quantity": "2"}, headers=headers)
        second = await http.post(usage_path(scenario), data={"quantity": "2"}, headers=headers)
        assert first.json() == second.json()
        assert "Idempotent-Replayed" not in first.headers
        assert second.headers["Idempotent-Replayed"] == "true"

    async def test_same_key_other_usage_is_refused(self, http, engine, scenario, standin):
        """A key reused for a different quantity gets Stripe's idempotency_error, nothing written."""
        await set_stage(engine, scenario.customer, Stage.METER)
        headers = {"Idempotency-Key": "reused-1"}
        assert (
            await http.post(usage_path(scenario), data={"quantity": "2"}, headers=headers)
        ).is_success
        second = await http.post(usage_path(scenario), data={"quantity": "3"}, headers=headers)
        assert second.status_code == 400
        assert second.json()["error"]["type"] == "idempotency_error"
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 2


class TestUsageInput:
    """Malformed usage requests are refused like Stripe refuses them, and write nothing."""

    @pytest.mark.parametrize(
        ("form", "param"),
        [
            ({"quantity": "ten"}, "quantity"),
            ({}, "quantity"),
            ({"quantity": "1", "timestamp": "yesterday"}, "timestamp"),
            ({"quantity": "1", "action": "double"}, "action"),
            ({"quantity": "1", "colour": "blue"}, "colour"),
        ],
    )
    async def test_malformed_is_400_naming_the_param(
        self, form, param, http, engine, scenario, standin
    ):
        """Stripe's error shape, the param named, no write to Stripe and no Redis record."""
        await set_stage(engine, scenario.customer, Stage.PRIMARY)
        standin.reset_requests()
        response = await http.post(
            usage_path(scenario), data=form, headers={"Idempotency-Key": "m"}
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert [r for r in standin.requests if r.method == "POST"] == []
        assert standin.meter_events(scenario.customer) == []

    async def test_expand_is_accepted(self, http, engine, scenario):
        """expand[] (which Stripe takes on every endpoint) is not an unknown parameter."""
        await set_stage(engine, scenario.customer, Stage.METER)
        response = await http.post(
            usage_path(scenario),
            content=b"quantity=1&expand[]=subscription_item",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 200, response.text

    async def test_oversized_usage_body_is_413(self, http, scenario, standin):
        """A usage-record body past its (small) limit is refused before anything is read from it."""
        response = await http.post(
            usage_path(scenario),
            content=b"quantity=1&x=" + b"a" * 70_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

    async def test_no_key_is_answered_by_stripe(self, proxy, engine, scenario, standin):
        """Without a key the request goes to Stripe as is (401); the proxy's own key is never used."""
        await set_stage(engine, scenario.customer, Stage.METER)
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            response = await client.post(usage_path(scenario), data={"quantity": "5"})
        assert response.status_code == 401
        assert "API key" in response.json()["error"]["message"]
        assert standin.meter_events(scenario.customer) == []

    async def test_meter_refusal_is_stripes_error(self, http, engine, scenario, standin):
        """At primary, a meter event Stripe refuses comes back with Stripe's status and error."""
        await set_stage(engine, scenario.customer, Stage.PRIMARY)
        standin.faults.refuse(
            path="/v1/billing/meter_events", status=400, code="no_meter", message="No meter."
        )
        response = await http.post(usage_path(scenario), data={"quantity": "5"})
        assert response.status_code == 400
        assert response.json()["error"] == {
            "type": "invalid_request_error",
            "code": "no_meter",
            "message": "No meter.",
        }
        assert standin.legacy_total(scenario.item) == 0


class TestUpstreamFailures:
    """At legacy and shadow, Stripe's 5xx, 429 and timeouts reach the caller as Stripe sent them."""

    @pytest.mark.parametrize("stage", [Stage.LEGACY, Stage.SHADOW])
    async def test_500_passes_through(self, stage, http, engine, scenario, standin):
        """Status, error body and Request-Id of Stripe's 500; no meter event at shadow."""
        await set_stage(engine, scenario.customer, stage)
        standin.faults.refuse(path=USAGE_PATHS, status=500, type="api_error", message="Boom.")
        response = await http.post(usage_path(scenario), data={"quantity": "5"})
        assert response.status_code == 500
        assert response.json() == {"error": {"type": "api_error", "message": "Boom."}}
        assert response.headers["Request-Id"].startswith("req_")
        assert not response.headers["Request-Id"].startswith("req_dw_")
        # The refusal was counted before the reply, with nothing expected on either leg, and the
        # outbox holds nothing that could still reach Stripe.
        [row] = await engine.ledger.rows(customer=scenario.customer)
        assert row["legacy_refused_events"] == 1 and row["events"] == 0
        assert row["legacy_expected_events"] == row["meter_expected_events"] == 0
        depth = await engine.outbox.depth()
        assert depth.outstanding == depth.pending == depth.dead == 0
        assert standin.meter_events(scenario.customer) == []

    @pytest.mark.parametrize("stage", [Stage.LEGACY, Stage.SHADOW])
    async def test_429_keeps_should_retry(self, stage, http, engine, scenario, standin):
        """Stripe's 429 arrives with its Stripe-Should-Retry header."""
        await set_stage(engine, scenario.customer, stage)
        standin.faults.configure(rate=1.0, kinds=["429"], paths=[usage_path(scenario)])
        response = await http.post(usage_path(scenario), data={"quantity": "5"})
        assert response.status_code == 429
        assert response.headers["Stripe-Should-Retry"] == "true"
        assert response.json()["error"]["code"] == "rate_limit"

    @pytest.mark.parametrize("stage", [Stage.LEGACY, Stage.SHADOW])
    async def test_timeout_then_retry_counts_once(
        self, stage, redis_url, key_prefix, standin_url, scenario, standin
    ):
        """A timeout is a 504 api_error; the retry with the same key gets Stripe's saved reply."""
        settings = proxy_settings(
            redis_url,
            key_prefix,
            standin_url,
            legacy_price=scenario.legacy_price,
            stripe={"timeout": 0.5},
        )
        engine = DualWriteEngine.from_settings(settings)
        await set_stage(engine, scenario.customer, stage)
        await engine.aclose()
        standin.faults.configure(
            rate=1.0, kinds=["timeout"], paths=[usage_path(scenario)], timeout_seconds=3
        )
        headers = {**AUTH, "Idempotency-Key": "slow-1"}
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, headers=headers) as client:
                first = await client.post(usage_path(scenario), data={"quantity": "6"})
                assert first.status_code == 504
                assert first.json()["error"]["type"] == "api_error"
                assert "127.0.0.1" not in first.text and "Traceback" not in first.text
                standin.faults.clear()
                retry = await client.post(usage_path(scenario), data={"quantity": "6"})
            assert retry.status_code == 200
            assert retry.headers["Idempotent-Replayed"] == "true"  # Stripe's replay, passed on
            meter = 6 if stage is Stage.SHADOW else 0
            await eventually(lambda: standin.meter_total(scenario.customer, EVENT_NAME) == meter)
        assert standin.legacy_total(scenario.item) == 6

    async def test_forwarded_503_passes_through(self, http, scenario, standin):
        """A non-usage call gets Stripe's 5xx unchanged too."""
        standin.faults.configure(rate=1.0, kinds=["503"], paths=["/v1/customers"])
        response = await http.get(f"/v1/customers/{scenario.customer}")
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "api_error"


class TestItemResolution:
    """Items map to a customer and meter from config, the Redis cache, or one Stripe read."""

    async def test_looked_up_once_and_cached(self, http, engine, scenario, standin, settings):
        """One read of the item and its subscription; the cache holds the mapping, never a key."""
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        standin.reset_requests()
        for _ in range(3):
            assert (await http.post(usage_path(scenario), data={"quantity": "1"})).is_success
        reads = [r.path for r in standin.requests if r.method == "GET"]
        assert reads == [
            f"/v1/subscription_items/{scenario.item}",
            f"/v1/subscriptions/{scenario.subscription}",
        ]
        cached = json.loads(await engine.redis.get(engine.keys.item_mapping(scenario.item)))
        assert cached["customer"] == scenario.customer and cached["event_name"] == EVENT_NAME
        assert STRIPE_KEY not in json.dumps(cached)

    async def test_config_items_need_no_lookup(
        self, redis_url, key_prefix, standin_url, scenario, standin
    ):
        """An item in [items] is not read for its mapping; only its billing period, once."""
        settings = proxy_settings(redis_url, key_prefix, standin_url).model_copy(
            update={
                "items": {
                    scenario.item: ItemMapping(customer=scenario.customer, event_name=EVENT_NAME)
                }
            }
        )
        standin.reset_requests()
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client:
                response = await client.post(usage_path(scenario), data={"quantity": "2"})
        assert response.status_code == 200
        # "/v1": the one unauthenticated look at Stripe's clock (its Date) before the first usage.
        reads = [r.path for r in standin.requests if r.method == "GET" and r.path != "/v1"]
        assert reads == [
            f"/v1/subscription_items/{scenario.item}",
            f"/v1/subscriptions/{scenario.subscription}",
        ]

    async def test_lookup_key_maps_the_item(
        self, redis_url, key_prefix, standin_url, builder, standin
    ):
        """A price's lookup key, listed under a meter, maps the item."""
        await builder.customer()  # creates the meter
        client = builder.client
        product = await client.v1.products.create_async({"name": "Keyed"})
        price = await client.v1.prices.create_async(
            {
                "currency": "usd",
                "product": product.id,
                "unit_amount": 1,
                "lookup_key": "api-calls-legacy",
                "recurring": {"interval": "month", "usage_type": "metered"},
            },
            {"stripe_version": LEGACY_VERSION},
        )
        customer = await client.v1.customers.create_async({"name": "Keyed"})
        subscription = await client.v1.subscriptions.create_async(
            {"customer": customer.id, "items": [{"price": price.id}]},
            {"stripe_version": LEGACY_VERSION},
        )
        item = subscription["items"]["data"][0]["id"]
        meter = MeterMapping(event_name=EVENT_NAME, lookup_keys=("api-calls-legacy",))
        settings = proxy_settings(redis_url, key_prefix, standin_url).model_copy(
            update={"meters": (meter,)}
        )
        engine = DualWriteEngine.from_settings(settings)
        await set_stage(engine, customer.id, Stage.METER)
        await engine.aclose()
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
                path = f"/v1/subscription_items/{item}/usage_records"
                response = await http.post(path, data={"quantity": "9"})
        assert response.json()["id"].startswith("mbur_dw_")
        assert standin.meter_total(customer.id, EVENT_NAME) == 9

    async def test_lookup_failure_is_retryable_error(self, http, scenario, standin):
        """A 5xx on the item read gives the caller a retryable error; nothing is written."""
        standin.faults.configure(
            rate=1.0, kinds=["500"], paths=[f"/v1/subscription_items/{scenario.item}"]
        )
        response = await http.post(usage_path(scenario), data={"quantity": "3"})
        assert response.status_code == 500
        assert response.headers["Stripe-Should-Retry"] == "true"
        standin.faults.clear()
        assert standin.usage_records(scenario.item) == []


class TestUnmapped:
    """Usage for items that map to no meter is forwarded untouched, counted, never dropped."""

    @pytest.fixture
    def settings(self, redis_url, key_prefix, standin_url) -> Settings:
        """Settings whose meter lists no price: every item is unmapped."""
        return proxy_settings(redis_url, key_prefix, standin_url)

    async def test_forwarded_and_counted(self, http, engine, scenario, standin, settings):
        """Stripe's own reply, legacy only, the counter in Redis and in the report."""
        await set_stage(engine, scenario.customer, Stage.METER)
        standin.reset_requests()
        for index in range(3):
            response = await http.post(
                usage_path(scenario),
                data={"quantity": "2"},
                headers={"Idempotency-Key": f"u{index}"},
            )
            assert response.status_code == 200
            assert not response.json()["id"].startswith("mbur_dw_")
        assert standin.legacy_total(scenario.item) == 6
        assert standin.meter_events(scenario.customer) == []
        lookups = [
            r for r in standin.requests if r.path == f"/v1/subscription_items/{scenario.item}"
        ]
        assert len(lookups) == 1  # "unmapped" is remembered too
        assert await engine.redis.hget(engine.keys.items_unmapped, scenario.item) == "3"
        report = await build_report(engine.ledger, engine.resolver)
        assert report.unmapped.items == 1 and report.unmapped.requests == 3
        from rich.console import Console

        console = Console(record=True, width=200)
        console.print(render_table(report))
        assert "3 usage requests for 1 subscription items" in console.export_text()

    async def test_connect_requests_are_forwarded(self, http, engine, scenario, standin):
        """A Stripe-Account request is not dual-written: forwarded as is, counted."""
        response = await http.post(
            usage_path(scenario), data={"quantity": "1"}, headers={"Stripe-Account": "acct_123"}
        )
        assert response.status_code == 200
        assert await engine.redis.hget(engine.keys.items_unmapped, scenario.item) == "1"


class TestForwarding:
    """Everything else goes to the configured upstream, and only there, streamed both ways."""

    async def test_sdk_calls_pass_through(self, sdk, scenario):
        """Reads and writes of other resources work unchanged through the SDK."""
        customer = await sdk.v1.customers.retrieve_async(scenario.customer)
        assert customer.id == scenario.customer
        created = await sdk.v1.customers.create_async({"name": "Through the proxy"})
        assert created.id.startswith("cus_") and created.name == "Through the proxy"
        listed = await sdk.v1.subscription_items.list_async({"subscription": scenario.subscription})
        assert [item.id for item in listed.data] == [scenario.item]

    async def test_other_hosts_are_never_reached(self, proxy, scenario, standin):
        """Host header, absolute-form target and X-Forwarded-* name a decoy: it gets nothing."""
        decoy = StripeStandin(api_keys=[STRIPE_KEY])
        with serve_standin(decoy) as running:
            netloc = running.url.removeprefix("http://")
            requests = [
                f"GET http://{netloc}/v1/customers/{scenario.customer} HTTP/1.1\r\nHost: {netloc}\r\n",
                f"GET /v1/customers/{scenario.customer} HTTP/1.1\r\nHost: {netloc}\r\n"
                f"X-Forwarded-Host: {netloc}\r\nX-Forwarded-Proto: http\r\nForwarded: host={netloc}\r\n",
            ]
            for head in requests:
                reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                writer.write(
                    (
                        head + f"Authorization: Bearer {STRIPE_KEY}\r\nConnection: close\r\n\r\n"
                    ).encode()
                )
                await writer.drain()
                reply = await reader.read()
                writer.close()
                status = reply.split(b"\r\n", 1)[0]
                assert status == b"HTTP/1.1 200 OK", reply[:300]
                assert scenario.customer.encode() in reply
        assert decoy.requests == []
        assert [r.path for r in standin.requests][-2:] == [f"/v1/customers/{scenario.customer}"] * 2

    async def test_headers_in_and_out(self, redis_url, key_prefix):
        """Stripe's headers go up, others do not; Stripe's come back, hop-by-hop ones do not."""
        recorder = Recorder()
        with (
            serve_asgi(recorder) as url,
            serve_proxy(proxy_settings(redis_url, key_prefix, url)) as proxy,
        ):
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                response = await client.post(
                    "/v1/limited?expand[]=a",
                    content=b"name=x",
                    headers={
                        **AUTH,
                        "Content-Type": "application/x-www-form-urlencoded",
                        "Stripe-Version": LEGACY_VERSION,
                        "Stripe-Account": "acct_1",
                        "Idempotency-Key": "hdr-1",
                        "Stripe-Context": "ctx_1",
                        "X-Stripe-Client-User-Agent": "{}",
                        "User-Agent": "Stripe/v1 PythonBindings/16.1.0",
                        "Cookie": "session=secret",
                        "X-Forwarded-For": "10.0.0.1",
                    },
                )
        sent = recorder.headers[0]
        for name in (
            "authorization",
            "stripe-version",
            "stripe-account",
            "idempotency-key",
            "stripe-context",
            "x-stripe-client-user-agent",
            "content-type",
        ):
            assert name in sent, name
        assert sent["user-agent"] == "Stripe/v1 PythonBindings/16.1.0"
        assert "cookie" not in sent and "x-forwarded-for" not in sent
        assert response.status_code == 429
        assert response.headers["Request-Id"] == "req_recorded"
        assert response.headers["Stripe-Should-Retry"] == "true"
        assert response.headers["Retry-After"] == "2"
        assert response.headers["X-Custom-Upstream"] == "kept"
        assert "keep-alive" not in response.headers
        assert response.json()["received"] == len(b"name=x")

    async def test_nothing_added_and_bodies_untouched(self, redis_url, key_prefix):
        """The upstream gets no header the caller did not send (no Accept, Accept-Encoding,
        User-Agent or Content-Type of the proxy's own), a value that is not UTF-8 arrives as the
        UTF-8 of its Latin-1 reading, and a gzip reply comes back byte for byte, still encoded."""
        recorder = Recorder()
        with (
            serve_asgi(recorder) as url,
            serve_proxy(proxy_settings(redis_url, key_prefix, url)) as proxy,
        ):
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(
                f"POST /v1/customers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {STRIPE_KEY}\r\n"
                "Content-Length: 6\r\nIdempotency-Key: caf\xe9\r\n\r\nname=x".encode("latin-1")
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.close()
            async with (
                httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client,
                client.stream("GET", "/v1/gzipped", headers={"Accept-Encoding": "gzip"}) as reply,
            ):
                raw = b"".join([chunk async for chunk in reply.aiter_raw()])
        sent = recorder.headers[0]
        assert set(sent) == {"host", "authorization", "content-length", "idempotency-key"}, sent
        assert sent["content-length"] == "6" and sent["idempotency-key"] == "caf\u00e9"
        assert recorder.headers[1]["accept-encoding"] == "gzip"
        assert reply.headers["content-encoding"] == "gzip"
        assert raw == GZIPPED

    async def test_large_bodies_stream_both_ways(self, redis_url, key_prefix):
        """8 MiB up and 8 MiB down: each half reaches the far side before the other half is sent."""
        recorder = Recorder()
        payload = b"".join(bytes([index % 251]) * 65536 for index in range(128))
        with (
            serve_asgi(recorder) as url,
            serve_proxy(proxy_settings(redis_url, key_prefix, url)) as proxy,
        ):

            async def upload() -> AsyncIterator[bytes]:
                half = len(payload) // 2
                for start in range(0, half, 65536):
                    yield payload[start : start + 65536]
                # The upstream must see the first half while the second is still held back.
                await eventually(lambda: recorder.received >= 1024 * 1024, seconds=5)
                for start in range(half, len(payload), 65536):
                    yield payload[start : start + 65536]

            async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=20) as client:
                response = await client.post("/v1/upload", content=upload())
                assert response.json() == {
                    "received": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest(),
                }
                received = 0
                async with client.stream("GET", "/v1/download") as stream:
                    async for chunk in stream.aiter_raw():
                        received += len(chunk)
                        if received >= 1024 * 1024:
                            recorder.ack.set()
        assert received == Recorder.STREAM_BYTES

    @pytest.mark.parametrize("chunked", [False, True])
    async def test_body_limit_is_413(self, chunked, redis_url, key_prefix):
        """A body over the limit gets Stripe's 413 shape, with or without a Content-Length."""
        recorder = Recorder()
        body = b"a" * (2 * 1024 * 1024)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        with serve_asgi(recorder) as url:
            settings = proxy_settings(redis_url, key_prefix, url)
            with serve_proxy(settings, max_body_bytes=1024 * 1024) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client:
                    response = await client.post("/v1/files", content=chunks() if chunked else body)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert recorder.received < len(body)

    async def test_unreachable_and_slow_upstreams(self, redis_url, key_prefix):
        """Connection failures are 502 and timeouts 504, Stripe-shaped, without the address."""
        refused = create_proxy_app(proxy_settings(redis_url, key_prefix, "http://127.0.0.1:1"))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=refused), base_url="http://p"
        ) as client:
            response = await client.get("/v1/customers", headers=AUTH)
        await refused.aclose()
        assert response.status_code == 502
        assert response.json()["error"]["type"] == "api_error"
        assert "127.0.0.1" not in response.text
        with serve_asgi(Recorder()) as url:
            slow = create_proxy_app(
                proxy_settings(redis_url, key_prefix, url, stripe={"timeout": 0.3})
            )
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=slow), base_url="http://p"
            ) as client:
                response = await client.get("/v1/slow", headers=AUTH)
            await slow.aclose()
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "api_error"
        assert url.removeprefix("http://") not in response.text


class TestPool:
    """The upstream pool holds ``max_connections`` keep-alive connections, no more."""

    async def test_connections_are_capped_and_reused(self, redis_url, key_prefix):
        """Six concurrent calls with max_connections=2 share two upstream connections, which later
        calls reuse (same client ports at the upstream)."""
        recorder = Recorder()
        with serve_asgi(recorder) as url:
            settings = proxy_settings(redis_url, key_prefix, url, stripe={"max_connections": 2})
            with serve_proxy(settings) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client:
                    async with anyio.create_task_group() as group:
                        for _ in range(6):
                            group.start_soon(client.post, "/v1/pause")
                    concurrent = set(recorder.clients)
                    for _ in range(3):
                        assert (await client.get("/v1/customers")).status_code == 200
                assert proxy.app is not None
                # Forwarded calls take the fast path's pool (``_fast``), capped like aiohttp's.
                assert proxy.app.pool.limit == 2 and proxy.app.pool.open_connections == 2
        assert recorder.requests == 9
        assert len(concurrent) == 2
        assert set(recorder.clients) == concurrent


class TestHealthAndSecrets:
    """The health endpoint, and the caller's key never landing anywhere."""

    async def test_health_up(self, http, standin):
        """200 with Redis ok and the outbox depth; never forwarded to Stripe."""
        standin.reset_requests()
        response = await http.get(HEALTH_PATH)
        assert response.status_code == 200
        data = response.json()
        assert data["status"] == "ok" and data["redis"] == "ok" and data["worker"] == "running"
        assert data["outbox"]["outstanding"] == 0
        assert standin.requests == []

    async def test_health_down(self, standin_url):
        """503 when Redis does not answer."""
        settings = proxy_settings(
            "redis://127.0.0.1:1/0",
            "dwtest-down",
            standin_url,
            redis={"connect_timeout": 0.2, "socket_timeout": 0.2},
        )
        app = create_proxy_app(settings)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://p"
        ) as client:
            response = await client.get(HEALTH_PATH)
        await app.aclose()
        assert response.status_code == 503
        assert response.json()["redis"] == "unavailable"

    async def test_key_is_never_logged_or_stored(
        self, caplog, http, engine, builder, standin, redis_url, key_prefix
    ):
        """Across every stage, a refusal and a bad key: no log line and no Redis value holds a key."""
        caplog.set_level(logging.DEBUG)
        bad_key = "sk_test_notTheRightKeyAtAll0000000042"
        scenarios = {stage: await builder.customer() for stage in Stage}
        for stage, scenario in scenarios.items():
            await set_stage(engine, scenario.customer, stage)
            path = usage_path(scenario)
            ok = await http.post(
                path, data={"quantity": "1"}, headers={"Idempotency-Key": f"s-{stage}"}
            )
            assert ok.status_code == 200
            bad = {"Authorization": f"Bearer {bad_key}"}
            response = await http.post(path, data={"quantity": "1"}, headers=bad)
            assert response.status_code == 401
            assert bad_key not in response.text
        standin.faults.refuse(path=USAGE_PATHS, status=402, message="Refused.")
        refused = await http.post(usage_path(scenarios[Stage.SHADOW]), data={"quantity": "1"})
        assert refused.status_code == 402
        await eventually(lambda: len(standin.meter_events()) == 3)
        for secret in (STRIPE_KEY, bad_key):
            assert secret not in caplog.text
            for value in await prefix_values(redis_url, key_prefix):
                assert secret not in value
