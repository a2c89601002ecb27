"""Billing correctness (issue 13): every unit on the right legs, customer and period, across caller
retries, stage changes, crashes and clocks that disagree.

Each test is named after the case it covers. Totals are read back from the stand-in's Stripe
summary endpoints (usage record summaries, meter event summaries) per customer and leg, never
from dualwrite's own ledger.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine, StageSource
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import RecordOutcome, Stage
from dualwrite.proxy import HEALTH_PATH, serve_proxy
from dualwrite.report import build_report
from dualwrite.stripe_io import StripeClock
from dualwrite.testing import StripeStandin
from tests.cluster_support import free_port_pair
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.middleware.test_middleware import USAGE_ROUTE as MIDDLEWARE_ROUTE
from tests.oracle import Oracle
from tests.proxy.test_proxy import proxy_settings
from tests.scenarios.test_multiprocess import Processes, wait_until_up
from tests.support import (
    EVENT_NAME,
    Scenario,
    ScenarioBuilder,
    set_stage,
    summary_totals,
    usage,
)

pytestmark = pytest.mark.anyio

#: The middleware tests' usage route, reading a timestamp and an action as well.
USAGE_ROUTE = {**MIDDLEWARE_ROUTE, "timestamp": "json:timestamp", "action": "json:action"}


def usage_app() -> Starlette:
    """The user's app behind the middleware: it answers what was recorded."""

    async def recorded(request: Request) -> JSONResponse:
        outcome: RecordOutcome = request.state.dualwrite
        return JSONResponse({"stage": outcome.stage.value, "timestamp": outcome.event.timestamp})

    return Starlette(routes=[Route("/usage/{customer}", recorded, methods=["POST"])])


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """The test's settings, with the usage route."""
    return standin_settings(routes=(USAGE_ROUTE,))


def skewed(seconds: float) -> Callable[[], float]:
    """A host clock ``seconds`` ahead of (negative: behind) the real one, which Stripe's follows."""
    return lambda: time.time() + seconds


class App:
    """The middleware over the user's app, driven in-process; its engine delivers on demand."""

    def __init__(self, engine: DualWriteEngine, clock: Callable[[], float] = time.time):
        self.engine = engine
        middleware = DualWriteMiddleware(usage_app(), engine=engine, clock=clock)
        transport = httpx.ASGITransport(app=middleware)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://app")

    async def usage(self, scenario: Scenario, quantity: int, **fields: Any) -> httpx.Response:
        """POST one usage request for the scenario's customer and item."""
        body = {"item": scenario.item, "quantity": quantity, **fields}
        return await self.client.post(f"/usage/{scenario.customer}", json=body)

    async def deliver(self) -> None:
        """Deliver every shadow write now."""
        worker = self.engine.new_worker()
        await worker.start()
        with anyio.fail_after(30):
            await worker.drain()
        await worker.aclose()


@pytest.fixture
async def app_with_clock(
    settings: Settings,
) -> AsyncIterator[Callable[[Callable[[], float]], App]]:
    """Makes the app on an engine whose host clock is the one given."""
    engines: list[DualWriteEngine] = []
    clients: list[httpx.AsyncClient] = []

    def make(clock: Callable[[], float]) -> App:
        engine = DualWriteEngine.from_settings(settings, clock=clock)
        engines.append(engine)
        app = App(engine, clock)
        clients.append(app.client)
        return app

    yield make
    for client in clients:
        await client.aclose()
    for engine in engines:
        await engine.aclose()


class TestStripeClock:
    """Case 4: a host clock ahead of Stripe's never gets usage refused as 'in the future'."""

    @pytest.mark.parametrize("skew", [2.0, -2.0])
    @pytest.mark.parametrize("stage", [Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY])
    async def test_clock_skew_never_stamps_usage_after_stripes_now(
        self, skew, stage, app_with_clock, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """With the host clock 2 s ahead of (or behind) Stripe's, usage without a timestamp is
        written at every stage, both legs at one instant no later than Stripe's clock, and no
        shadow write is dead-lettered."""
        app = app_with_clock(skewed(skew))
        scenario = await builder.customer()
        await app.engine.start(worker=False)
        await set_stage(app.engine, scenario.customer, stage)
        for quantity in (3, 4, 5):
            response = await app.usage(scenario, quantity)
            assert response.status_code == 200, response.text
            assert response.json()["timestamp"] <= standin.clock.now()
        await app.deliver()
        legacy, meter = await summary_totals(builder.client, scenario)
        assert legacy == 12
        assert meter == (0 if stage is Stage.LEGACY else 12)
        assert (await app.engine.outbox.depth()).dead == 0
        if stage is not Stage.LEGACY:
            legacy_at = sorted(r["timestamp"] for r in standin.usage_records(scenario.item))
            meter_at = sorted(e["timestamp"] for e in standin.meter_events(scenario.customer))
            assert legacy_at == meter_at

    async def test_usage_is_refused_retryable_while_stripes_clock_cannot_be_read(
        self, settings: Settings, builder: ScenarioBuilder
    ):
        """Before this process has read Stripe's clock, and while Stripe cannot be reached, usage
        without a timestamp is refused as retryable (503), nothing written: this host's clock
        may be seconds off Stripe's, which near a period's start or end bills the wrong period."""
        scenario = await builder.customer()
        unreachable = f"http://127.0.0.1:{free_port_pair()}"
        stripe = settings.stripe.model_copy(update={"api_base": unreachable, "timeout": 1.0})
        engine = DualWriteEngine.from_settings(settings.model_copy(update={"stripe": stripe}))
        app = App(engine)
        try:
            await engine.start(worker=False)
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            for _ in range(2):  # the second within a second of the first look: not waited for
                response = await app.usage(scenario, 7)
                assert response.status_code == 503, response.text
                assert response.json()["error"]["type"] == "api_connection_error"
                assert float(response.headers["Retry-After"]) >= 1
            assert await unfinished_claims(engine) == 0
            depth = await engine.outbox.depth()
            assert depth.pending == depth.outstanding == depth.dead == 0
        finally:
            await app.client.aclose()
            await engine.aclose()

    async def test_usage_minted_before_stripes_clock_was_read_is_written_at_stripes_now(
        self, settings: Settings, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """A fresh process whose host clock is 5 minutes behind Stripe's, 20 concurrent usage
        requests: all of them minted "now" from the host clock, one read Stripe's clock first,
        the rest reached the engine after it (their stage reads were slow). Each is written at
        Stripe's now, in the period that has just begun, not 5 minutes before it (refused)."""
        scenario = await builder.customer()  # its period starts at Stripe's now
        behind = skewed(-300.0)
        engine = DualWriteEngine.from_settings(settings, clock=behind)
        await engine.start(worker=False)
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        slow = engine.resolver = SlowAfterFirst(engine.resolver)
        app = App(engine, behind)
        try:
            async with anyio.create_task_group() as group:
                replies: list[httpx.Response] = []

                async def one() -> None:
                    replies.append(await app.usage(scenario, 1))

                for _ in range(20):
                    group.start_soon(one)
            assert [r.status_code for r in replies] == [200] * 20, replies[0].text
            assert min(r.json()["timestamp"] for r in replies) >= standin.clock.now() - 10
            await app.deliver()
            assert await summary_totals(builder.client, scenario) == (20, 20)
        finally:
            engine.resolver = slow.inner  # closed with the engine
            await app.client.aclose()
            await engine.aclose()

    async def test_a_timestamp_is_judged_by_stripes_clock_before_any_reply_was_seen(
        self, app_with_clock, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """A fresh process whose host clock is 10 minutes behind Stripe's: usage stamped with
        Stripe's now is 10 minutes "in the future" by the host's clock, over the 5 minutes
        allowed. Stripe's clock is read first and judges it, as Stripe would: written."""
        standin.clock.advance(600)
        scenario = await builder.customer()
        app = app_with_clock(time.time)
        await app.engine.start(worker=False)
        await set_stage(app.engine, scenario.customer, Stage.SHADOW)
        assert not app.engine.writer.clock.known
        stamped = standin.clock.now()
        response = await app.usage(scenario, 4, timestamp=stamped)
        assert response.status_code == 200, response.text
        assert response.json()["timestamp"] == stamped
        await app.deliver()
        assert await summary_totals(builder.client, scenario) == (4, 4)

    async def test_clock_estimate_never_ahead_and_follows_a_step_back(self):
        """The estimate is the largest lower bound of recent replies: Stripe's Date, plus the
        local time since; a clock stepped back is followed once the window has passed."""
        local = [1_000.0]
        clock = StripeClock(local=lambda: local[0], window=0.05)
        assert not clock.known and clock.now() == 1_000
        clock.observe(formatdate(990, usegmt=True))  # Stripe is (at least) 10 s behind us
        local[0] = 1_003.5
        assert clock.now() == 993
        clock.observe(formatdate(994, usegmt=True))  # a later reply: at least 9.5 s behind
        assert clock.now() == 994
        clock.observe("not a date")
        assert clock.now() == 994
        clock.observe(formatdate(983, usegmt=True))  # Stripe's clock was stepped back
        assert clock.now() == 994  # within the window the larger bound holds
        await anyio.sleep(0.1)
        assert clock.now() == 983


class SlowAfterFirst:
    """A stage source whose every read but the first takes 0.3 s (a Redis answering slowly)."""

    def __init__(self, inner: StageSource):
        self.inner = inner
        self.reads = 0

    async def resolve(self, customer: str) -> Stage:
        """The inner source's stage, late after the first read."""
        self.reads += 1
        if self.reads > 1:
            await anyio.sleep(0.3)
        return await self.inner.resolve(customer)


def usage_path(scenario: Scenario) -> str:
    """The legacy usage-record endpoint of the scenario's item (what the proxy intercepts)."""
    return f"/v1/subscription_items/{scenario.item}/usage_records"


async def eventually(check: Callable[[], Awaitable[bool]], *, seconds: float = 15.0) -> None:
    """Wait until ``check()`` holds (another thread or process delivers shadow writes)."""
    with anyio.fail_after(seconds):
        while True:  # polls: the proxy's worker runs in its own thread
            if await check():
                return
            await anyio.sleep(0.05)


class TestPlanFixedAtFirstIntercept:
    """Case 1: every attempt of an event writes the legs of its first intercept, under its keys."""

    async def test_proxy_retry_across_stage_change_writes_legacy_once(
        self,
        redis_url,
        key_prefix,
        standin_url,
        builder: ScenarioBuilder,
        standin: StripeStandin,
        engine,
    ):
        """At shadow, Stripe's answer to the forwarded usage record comes after the proxy's
        timeout (504); the customer moves to primary; the caller retries with the same key: the
        legacy total holds the quantity once (Stripe replays the first write), the meter once."""
        scenario = await builder.customer()
        settings = proxy_settings(
            redis_url,
            key_prefix,
            standin_url,
            legacy_price=scenario.legacy_price,
            stripe={"timeout": 0.5},
            flags={"cache_ttl": 0},
        )
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        standin.faults.configure(
            rate=1.0, kinds=["timeout"], paths=[usage_path(scenario)], timeout_seconds=2
        )
        headers = {"Authorization": f"Bearer {STRIPE_KEY}", "Idempotency-Key": "crossing-1"}
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, headers=headers) as client:
                first = await client.post(usage_path(scenario), data={"quantity": "7"})
                assert first.status_code == 504
                standin.faults.clear()
                await set_stage(engine, scenario.customer, Stage.PRIMARY)
                retry = await client.post(usage_path(scenario), data={"quantity": "7"})
                assert retry.status_code == 200, retry.text

            async def settled() -> bool:
                return (await summary_totals(builder.client, scenario))[1] == 7

            await eventually(settled)
        assert await summary_totals(builder.client, scenario) == (7, 7)
        assert len(standin.usage_records(scenario.item)) == 1

    async def test_retry_across_stage_change_keeps_first_plan(
        self, app_with_clock, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """Middleware: the first attempt at shadow gets no answer in time; at primary the retry
        is still the shadow-stage event (legacy authoritative, meter shadow), written once."""
        app = app_with_clock(time.time)
        await app.engine.start(worker=False)
        scenario = await builder.customer()
        await set_stage(app.engine, scenario.customer, Stage.SHADOW)
        standin.faults.configure(
            rate=1.0, kinds=["timeout"], paths=[usage_path(scenario)], timeout_seconds=2
        )
        headers = {"Idempotency-Key": "crossing-2"}
        body = {"item": scenario.item, "quantity": 6}
        first = await app.client.post(f"/usage/{scenario.customer}", json=body, headers=headers)
        assert first.status_code >= 500
        standin.faults.clear()
        await set_stage(app.engine, scenario.customer, Stage.PRIMARY)
        retry = await app.client.post(f"/usage/{scenario.customer}", json=body, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.json()["stage"] == "shadow"
        await app.deliver()
        assert await summary_totals(builder.client, scenario) == (6, 6)
        [row] = await app.engine.ledger.rows(customer=scenario.customer)
        assert row["stage_shadow_events"] == 1 and row["stage_primary_events"] == 0
        assert row["legacy_accepted_qty"] == row["meter_accepted_qty"] == 6


class TestOneInstant:
    """Case 5: through the proxy, ``timestamp=now`` (or none) is one instant on both legs."""

    @pytest.mark.parametrize("form", [{"timestamp": "now"}, {}])
    async def test_proxy_now_is_one_instant_on_both_legs(
        self, form, redis_url, key_prefix, standin_url, builder, standin: StripeStandin, engine
    ):
        """At shadow, with Stripe answering 1.1 s after the request arrives, the usage record and
        the meter event carry the same timestamp (the forwarded request names it, under a key
        Stripe keeps even when the caller sent none)."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        settings = proxy_settings(
            redis_url, key_prefix, standin_url, legacy_price=scenario.legacy_price
        )
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(
                base_url=proxy.url, headers={"Authorization": f"Bearer {STRIPE_KEY}"}
            ) as client:
                await client.get(f"/v1/customers/{scenario.customer}")  # Stripe's clock, seen
                standin.latency_seconds = 1.1
                response = await client.post(usage_path(scenario), data={"quantity": "3", **form})
                assert response.status_code == 200, response.text
                standin.latency_seconds = 0.0

            async def delivered() -> bool:
                return len(standin.meter_events(scenario.customer)) == 1

            await eventually(delivered)
        [record] = standin.usage_records(scenario.item)
        [meter_event] = standin.meter_events(scenario.customer)
        assert record["timestamp"] == meter_event["timestamp"]
        [sent] = [r for r in standin.requests if r.path == usage_path(scenario)]
        assert sent.params["timestamp"] == str(record["timestamp"])
        assert sent.idempotency_key is not None and sent.idempotency_key.startswith("dw-legacy-")


class TestRecovery:
    """Case 2: an event left between its authoritative write and its commit is finished by the
    workers, without a caller; until then the report calls its customer pending."""

    @pytest.mark.parametrize("identifier", ["caller-key-1", None])
    async def test_crash_between_write_and_commit_is_recovered(
        self, identifier, standin_settings, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """The holder dies (its task is cancelled) after Stripe executed the usage record and
        before the commit; the caller never retries. The report says pending, never parity;
        a worker replays the write under the same key and commits it with its shadow: each leg
        holds the quantity once."""
        settings = standin_settings(
            ledger={"inflight_lease_seconds": 1}, stripe={"timeout": 10, "request_retries": 0}
        )
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        try:
            scenario = await builder.customer()
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            standin.faults.configure(
                rate=1.0, kinds=["timeout"], paths=[usage_path(scenario)], timeout_seconds=5
            )
            holder = asyncio.create_task(engine.record(usage(scenario, 9, identifier=identifier)))

            async def written() -> bool:
                return bool(standin.usage_records(scenario.item))

            await eventually(written, seconds=5)
            holder.cancel()  # the process dies: nothing after the write runs
            await asyncio.gather(holder, return_exceptions=True)
            standin.faults.clear()
            [line] = (await build_report(engine.ledger, engine.resolver)).customers
            assert line.status == "pending" and line.unfinished_events == 1
            worker = engine.new_worker()
            await worker.start()
            try:

                async def recovered() -> bool:
                    return await summary_totals(builder.client, scenario) == (9, 9)

                await eventually(recovered)
            finally:
                await worker.aclose()
            [line] = (await build_report(engine.ledger, engine.resolver)).customers
            assert line.status == "parity" and line.unfinished_events == 0
            assert len(standin.usage_records(scenario.item)) == 1
            assert await engine.redis.zcard(engine.keys.for_customer(scenario.customer).claims) == 0
        finally:
            await engine.aclose()


async def usage_until_accepted(app: App, scenario: Scenario, quantity: int, **fields: Any) -> None:
    """Send one usage request, retrying 409s with the same key as Stripe's SDKs retry them."""
    key = f"set-{uuid.uuid4().hex}"
    body = {"item": scenario.item, "quantity": quantity, **fields}
    for _ in range(200):
        response = await app.client.post(
            f"/usage/{scenario.customer}", json=body, headers={"Idempotency-Key": key}
        )
        if response.status_code != 409:
            assert response.status_code == 200, response.text
            return
        await anyio.sleep(0.01)
    pytest.fail("a set never got its turn")


async def set_up_sets(
    app_with_clock: Callable[[Callable[[], float]], App],
    builder: ScenarioBuilder,
    standin: StripeStandin,
    stage: Stage,
) -> tuple[App, Scenario, int]:
    """The app, a customer at ``stage``, and its subscription's start, 30 s in the past (sets at
    timestamps of those 30 seconds are in its current period)."""
    app = app_with_clock(time.time)
    await app.engine.start(worker=False)
    scenario = await builder.customer()
    await set_stage(app.engine, scenario.customer, stage)
    start = standin.clock.now()
    standin.clock.advance(30)
    return app, scenario, start


class TestSetTranslation:
    """Case 3: ``set`` usage keeps the legacy value and the meter's sum of differences equal."""

    async def test_concurrent_sets_at_one_timestamp_agree_on_both_legs(
        self, app_with_clock, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """Ten timestamps, two concurrent sets (10 and 15) at each, at shadow: the previous
        value is read and replaced in one step, so the meter's differences add up to the value
        legacy keeps (whichever set came last)."""
        app, scenario, start = await set_up_sets(app_with_clock, builder, standin, Stage.SHADOW)
        for offset in range(10):
            async with anyio.create_task_group() as group:
                for quantity in (10, 15):
                    group.start_soon(
                        partial(
                            usage_until_accepted,
                            app,
                            scenario,
                            quantity,
                            action="set",
                            timestamp=start + offset,
                        )
                    )
        await app.deliver()
        legacy, meter = await summary_totals(builder.client, scenario)
        assert 100 <= legacy <= 150 and meter == legacy

    async def test_set_shadows_are_delivered_in_intercept_order(
        self, app_with_clock, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """At primary, five sequential sets at each of five timestamps, then delivery with 40 %
        of the legacy shadow writes failing (retried out of order): a later set supersedes an
        earlier undelivered one, and legacy keeps each timestamp's last value, as the meter."""
        app, scenario, start = await set_up_sets(app_with_clock, builder, standin, Stage.PRIMARY)
        for offset in range(5):
            for quantity in (10, 20, 5, 40, 15):
                await usage_until_accepted(
                    app, scenario, quantity, action="set", timestamp=start + offset
                )
        standin.faults.configure(rate=0.4, kinds=["500"], paths=[usage_path(scenario)])
        await app.deliver()
        standin.faults.clear()
        assert await summary_totals(builder.client, scenario) == (75, 75)
        assert (await app.engine.outbox.depth()).dead == 0


class TestItemOwnership:
    """Case 6: usage naming one customer and another customer's item is refused, never split."""

    @pytest.mark.parametrize("stage", [Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY])
    async def test_customer_item_mismatch_is_refused_and_writes_nothing(
        self, stage, app_with_clock, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """``POST /usage/cus_A`` with cus_B's subscription item: Stripe's 400 naming
        ``subscription_item``, no usage record, no meter event, nothing queued; the customer's
        own item still works."""
        app = app_with_clock(time.time)
        await app.engine.start(worker=False)
        a, b = await builder.customer("A"), await builder.customer("B")
        await set_stage(app.engine, a.customer, stage)
        response = await app.client.post(
            f"/usage/{a.customer}", json={"item": b.item, "quantity": 8}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "subscription_item" and error["type"] == "invalid_request_error"
        await app.deliver()
        for scenario in (a, b):
            assert await summary_totals(builder.client, scenario) == (0, 0)
        assert standin.usage_records() == [] and standin.meter_events() == []
        assert (await app.engine.outbox.depth()).outstanding == 0
        assert (await app.usage(a, 2)).status_code == 200


def crash_config(
    path: Path, *, redis_url: str, prefix: str, standin: str, scenarios: list[Scenario]
) -> Path:
    """The config every process of a crash test reads: short claim leases, no in-process worker,
    the items mapped in advance (nothing but the usage itself waits for the slow Stripe)."""
    items = "".join(
        f'\n[items.{s.item}]\ncustomer = "{s.customer}"\nevent_name = "{EVENT_NAME}"\n'
        for s in scenarios
    )
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nkey_prefix = "{prefix}"\nshards = 4\n\n'
        f'[stripe]\napi_base = "{standin}"\ntimeout = 15.0\n\n'
        "[flags]\ncache_ttl = 600\n\n"
        "[outbox]\nrun_in_process = false\nblock_ms = 50\nbackoff_base = 0.05\n"
        "backoff_max = 0.5\nclaim_idle_seconds = 1.0\n\n"
        "[ledger]\ninflight_lease_seconds = 3\n\n"
        # A dead process's meter turns run out in 5 s (30 s by default).
        "[limits]\nlegacy_per_second = 0\nturn_lease_seconds = 5\n\n"
        f'[[meters]]\nevent_name = "{EVENT_NAME}"\nlegacy_prices = ["{scenarios[0].legacy_price}"]\n'
        + items
    )
    return path


def base4_digits(total: float) -> dict[int, int]:
    """Each power of four in ``total`` and how many times it is there (quantities are distinct
    powers of four per customer: a digit of 2 is an event counted twice)."""
    value, digits, power = int(total), {}, 0
    assert value == total, total
    while value:
        value, digit = divmod(value, 4)
        if digit:
            digits[power] = digit
        power += 1
    return digits


async def unfinished_claims(engine: DualWriteEngine) -> int:
    """Events claimed and not yet committed, over every shard."""
    return sum([await engine.redis.zcard(shard.claims) for shard in engine.keys.all_shards()])


@pytest.mark.slow
class TestCrashRecovery:
    """Case 2 at scale: the proxy SIGKILLed with hundreds of usage requests in flight."""

    async def test_sigkill_with_requests_in_flight_loses_and_doubles_nothing(
        self, tmp_path, redis_url, key_prefix, standin_url, builder, standin: StripeStandin
    ):
        """30 customers (20 at shadow, 10 at primary), 240 usage requests in flight against a
        Stripe answering in 3 s (half without an Idempotency-Key), the proxy SIGKILLed, callers
        that never retry; then one worker. Per customer, through Stripe's summary endpoints: no
        event is counted twice (quantities are distinct powers of four), every acknowledged event
        is there, and the report said pending, never parity, until the worker recovered the
        unfinished events. Then the oracle (``tests/oracle.py``), from the stages the test set:
        both legs' summaries and every ledger row hold exactly the acknowledged events plus those
        recovered (an event whose caller got no answer is told to the oracle as accepted when its
        authoritative leg holds it, the only record of its fate; one that never reached a claim
        is nowhere)."""
        scenarios = [await builder.customer(f"crash {n}") for n in range(30)]
        config = crash_config(
            tmp_path / "dualwrite.toml",
            redis_url=redis_url,
            prefix=key_prefix,
            standin=standin_url,
            scenarios=scenarios,
        )
        engine = DualWriteEngine.from_settings(Settings.load(config))
        await engine.start(worker=False)
        env = {
            **os.environ,
            "STRIPE_API_KEY": STRIPE_KEY,
            "XDG_STATE_HOME": str(tmp_path / "state"),
            "DUALWRITE_CONFIG": str(config),
        }
        processes = Processes(tmp_path, env)
        sent: dict[str, list[int]] = {s.customer: [] for s in scenarios}
        acked: dict[str, list[int]] = {s.customer: [] for s in scenarios}
        sent_at: dict[tuple[str, int], int] = {}
        stages = {
            s.customer: Stage.SHADOW if n < 20 else Stage.PRIMARY for n, s in enumerate(scenarios)
        }
        try:
            for scenario in scenarios:
                await set_stage(engine, scenario.customer, stages[scenario.customer])
            port = free_port_pair()
            processes.start("proxy", "serve", "--port", str(port), "--no-access-log")
            url = f"http://127.0.0.1:{port}"
            await wait_until_up(url + HEALTH_PATH, "proxy", processes)
            auth = {"Authorization": f"Bearer {STRIPE_KEY}"}
            limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
            async with httpx.AsyncClient(
                base_url=url, headers=auth, timeout=30, limits=limits
            ) as client:
                # Stripe's clock, seen once through the proxy before Stripe slows down.
                assert (await client.get(f"/v1/customers/{scenarios[0].customer}")).is_success
                # 3 s: on a loaded machine sending 240 requests can take over a second, and the
                # first answered would leave fewer than 200 in flight to kill.
                standin.latency_seconds = 3.0

                async def one(scenario: Scenario, power: int, keyed: bool) -> None:
                    quantity = 4**power
                    sent[scenario.customer].append(power)
                    sent_at[(scenario.customer, power)] = int(time.time())  # the proxy stamps it
                    headers = {"Idempotency-Key": f"crash-{scenario.customer}-{power}"}
                    try:
                        response = await client.post(
                            usage_path(scenario),
                            data={"quantity": str(quantity)},
                            headers=headers if keyed else {},
                        )
                    except httpx.TransportError:
                        return  # in doubt: the proxy died with it
                    if response.status_code == 200:
                        acked[scenario.customer].append(power)

                async with anyio.create_task_group() as group:
                    for power in range(8):
                        for n, scenario in enumerate(scenarios):
                            group.start_soon(one, scenario, power, (n + power) % 2 == 0)
                            await anyio.sleep(0.005)  # 240 requests over about 1.2 s

                    async def held() -> bool:  # the proxy holds at least 200 of them
                        return await unfinished_claims(engine) >= 200

                    await eventually(held)
                    processes.running["proxy"].kill()  # SIGKILL: every request still in flight
                    processes.running.pop("proxy").wait()
            standin.latency_seconds = 0.05
            assert sum(len(powers) for powers in sent.values()) == 240
            report = await build_report(engine.ledger, engine.resolver)
            unfinished = [line for line in report.customers if line.unfinished_events]
            assert sum(line.unfinished_events for line in unfinished) >= 200
            assert all(line.status != "parity" for line in unfinished)

            processes.start("worker", "worker", "--name", "recovery")

            async def recovered() -> bool:
                depth = await engine.outbox.depth()
                claims = await unfinished_claims(engine)
                return claims == 0 and depth.outstanding == 0 and depth.pending == 0

            await eventually(recovered, seconds=120)
            assert processes.stop("worker") == 0
            report = await build_report(engine.ledger, engine.resolver)
            dead = (await engine.outbox.depth()).dead
            assert dead == 0
            assert all(line.status == "parity" for line in report.customers)
            oracle = Oracle()
            landed_unacked = 0
            for scenario in scenarios:
                customer = scenario.customer
                stage = stages[customer]
                oracle.set_stage(scenario, stage)
                legacy, meter = await summary_totals(builder.client, scenario)
                for total in (legacy, meter):
                    digits = base4_digits(total)
                    assert set(digits.values()) <= {1}, (customer, digits)  # none twice
                    assert set(acked[customer]) <= set(digits)  # none acknowledged lost
                    assert set(digits) <= set(sent[customer])
                # The authoritative leg says which unanswered events were recovered.
                landed = base4_digits(legacy if stage is Stage.SHADOW else meter)
                landed_unacked += len(set(landed) - set(acked[customer]))
                for power in sent[customer]:
                    if power in acked[customer] or power in landed:
                        at = sent_at[(customer, power)]
                        oracle.tell(scenario, 4**power, timestamp=at, accepted=True)
            assert landed_unacked >= 100  # recovery, not the callers, finished most of them
            # The proxy stamps usage a moment after the test noted the time (3 s of latency).
            await oracle.assert_stripe(builder.client, slack=60)
            await oracle.assert_ledger(engine.ledger)
        finally:
            standin.latency_seconds = 0.0
            processes.stop_all()
            await engine.aclose()
