"""Prometheus metrics (``dualwrite.metrics``): counters move with real traffic through the proxy
and the engine against the Stripe stand-in; ``/metrics`` is guarded by its optional token."""

from __future__ import annotations

import gc

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from dualwrite.config import MeterMapping, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.metrics import metrics_app
from dualwrite.models import Stage
from dualwrite.proxy import serve_proxy
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    ScenarioBuilder,
    make_settings,
    set_stage,
    unreachable_redis_settings,
    usage,
)

pytestmark = pytest.mark.anyio

METRICS_TOKEN = "metrics-token-for-tests-0123456789"


@pytest.fixture(autouse=True)
def _no_token_from_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's shell never supplies a token to these tests."""
    monkeypatch.delenv("DUALWRITE_METRICS_TOKEN", raising=False)


def value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def writes(text: str, path: str, stage: str, role: str, result: str = "accepted") -> float:
    """``dualwrite_writes_total`` for one label set."""
    return value(text, "dualwrite_writes_total", path=path, stage=stage, role=role, result=result)


async def scrape(app: object, **headers: str) -> httpx.Response:
    """GET the metrics app in-process."""
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as client:
        return await client.get("/metrics", headers=headers)


class TestThroughTheProxy:
    """Usage records sent through ``dualwrite serve`` move the counters on its ``/metrics``."""

    async def test_counters_move_with_traffic(
        self,
        redis_url: str,
        key_prefix: str,
        standin_url: str,
        standin: StripeStandin,
        builder: ScenarioBuilder,
        engine: DualWriteEngine,
    ) -> None:
        """Authoritative and shadow writes, shadow lag and stage lookups are counted per label."""
        shadow, meter = await builder.customer(), await builder.customer()
        await set_stage(engine, shadow.customer, Stage.SHADOW)
        await set_stage(engine, meter.customer, Stage.METER)
        settings = make_settings(
            redis_url=redis_url, prefix=key_prefix, api_base=standin_url, api_key=STRIPE_KEY
        ).model_copy(
            update={
                "meters": (
                    MeterMapping(event_name=EVENT_NAME, legacy_prices=(shadow.legacy_price,)),
                ),
                "metrics_token": SecretStr(METRICS_TOKEN),
            }
        )
        auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=20) as http:
                assert (await http.get("/metrics")).status_code == 401
                wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
                before = (await http.get("/metrics", headers=auth)).text
                stripe_auth = {
                    "Authorization": f"Bearer {STRIPE_KEY}",
                    "Stripe-Version": LEGACY_VERSION,
                }
                for scenario, count in ((shadow, 3), (meter, 2)):
                    for _ in range(count):
                        response = await http.post(
                            f"/v1/subscription_items/{scenario.item}/usage_records",
                            data={"quantity": "4", "timestamp": "now"},
                            headers=stripe_auth,
                        )
                        assert response.status_code == 200, response.text
                with anyio.fail_after(10):
                    while True:  # the proxy's worker delivers the shadow writes in its thread
                        after = (await http.get("/metrics", headers=auth)).text
                        if (
                            standin.meter_total(shadow.customer, EVENT_NAME) == 12
                            and writes(after, "meter", "shadow", "shadow")
                            - writes(before, "meter", "shadow", "shadow")
                            >= 3
                            and value(after, "dualwrite_outbox_entries", state="ready") == 0
                        ):
                            break
                        await anyio.sleep(0.02)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert (
            writes(after, "legacy", "shadow", "authoritative")
            - writes(before, "legacy", "shadow", "authoritative")
            == 3
        )
        assert (
            writes(after, "meter", "shadow", "shadow") - writes(before, "meter", "shadow", "shadow")
            == 3
        )
        assert (
            writes(after, "meter", "meter", "authoritative")
            - writes(before, "meter", "meter", "authoritative")
            == 2
        )
        assert delta("dualwrite_shadow_lag_seconds_count", path="meter") == 3
        assert delta("dualwrite_authoritative_write_seconds_count", path="meter") == 2
        assert delta("dualwrite_stage_cache_misses_total") >= 2
        assert (
            delta("dualwrite_stage_cache_hits_total") + delta("dualwrite_stage_cache_misses_total")
            >= 5
        )
        assert value(after, "dualwrite_redis_up") == 1
        assert value(after, "dualwrite_outbox_oldest_age_seconds") == 0
        assert value(after, "process_resident_memory_bytes") > 0


class TestThroughTheEngine:
    """Engine traffic moves divergence, rate-limit and outbox figures."""

    async def test_outbox_gauges_and_translation(
        self, engine: DualWriteEngine, builder: ScenarioBuilder, settings: Settings
    ) -> None:
        """A queued shadow write shows in the depth and age gauges; a translated set counts."""
        scenario = await builder.customer()
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        app = metrics_app(settings, engine=engine)
        before = (await scrape(app)).text
        await engine.record(usage(scenario, 7, action="set"))
        queued = (await scrape(app)).text
        assert value(queued, "dualwrite_outbox_entries", state="ready") == 1
        assert 0 <= value(queued, "dualwrite_outbox_oldest_age_seconds") < 60
        assert value(queued, "dualwrite_divergence_log_entries") == 1
        assert (
            value(queued, "dualwrite_divergences_total", kind="translated")
            - value(before, "dualwrite_divergences_total", kind="translated")
            == 1
        )
        worker = engine.new_worker()
        with anyio.fail_after(10):
            await worker.drain()
        drained = (await scrape(app)).text
        assert value(drained, "dualwrite_outbox_entries", state="ready") == 0
        assert value(drained, "dualwrite_outbox_oldest_age_seconds") == 0

    async def test_rate_limit_waits(
        self, standin_settings: SettingsFactory, builder: ScenarioBuilder
    ) -> None:
        """Writes over a shared rate limit wait, and each wait is counted and timed."""
        settings = standin_settings(limits={"legacy_per_second": 20, "burst_seconds": 0.05})
        scenario = await builder.customer()
        app = metrics_app()
        before = (await scrape(app)).text
        async with DualWriteEngine.from_settings(settings) as engine:
            for _ in range(4):
                outcome = await engine.record(usage(scenario, 1))
                assert outcome.accepted
        after = (await scrape(app)).text
        waits = value(after, "dualwrite_rate_limit_waits_total", limit="legacy") - value(
            before, "dualwrite_rate_limit_waits_total", limit="legacy"
        )
        timed = value(after, "dualwrite_rate_limit_wait_seconds_count", limit="legacy") - value(
            before, "dualwrite_rate_limit_wait_seconds_count", limit="legacy"
        )
        assert waits >= 2
        assert timed == waits


class TestEndpoint:
    """The endpoint itself: formats, methods, Redis down, token."""

    async def test_redis_down_still_answers(self, key_prefix: str) -> None:
        """Without Redis the scrape answers 200 with ``dualwrite_redis_up 0`` and the counters."""
        settings = unreachable_redis_settings(key_prefix)
        app = metrics_app(settings)
        try:
            response = await scrape(app)
        finally:
            await app.aclose()
        assert response.status_code == 200
        assert value(response.text, "dualwrite_redis_up") == 0
        assert "dualwrite_writes_total" in response.text
        assert "s3cret" not in response.text

    async def test_openmetrics_and_methods(self) -> None:
        """OpenMetrics on request; anything but GET/HEAD gets Stripe's 405."""
        app = metrics_app()
        response = await scrape(app, Accept="application/openmetrics-text; version=1.0.0")
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.rstrip().endswith("# EOF")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as client:
            response = await client.post("/metrics")
        assert response.status_code == 405
        assert response.json()["error"]["type"] == "invalid_request_error"

    async def test_token_when_set(self) -> None:
        """With a token, only the right bearer gets the metrics; without one, anyone does."""
        guarded = metrics_app(token=METRICS_TOKEN)
        assert (await scrape(guarded)).status_code == 401
        assert (
            await scrape(guarded, Authorization="Bearer wrong-token-0123456789")
        ).status_code == 401
        response = await scrape(guarded, Authorization=f"Bearer {METRICS_TOKEN}")
        assert response.status_code == 200
        assert METRICS_TOKEN not in response.text
        assert (await scrape(metrics_app())).status_code == 200


class TestStageCacheCounters:
    """The stage cache counters are Prometheus counters: they never go down."""

    async def test_a_collected_resolvers_counts_are_kept(self, engine: DualWriteEngine) -> None:
        """A resolver garbage-collected between two scrapes leaves its misses in the total (the
        sum over live resolvers alone went down, and a rate() over it read a counter reset)."""
        from dualwrite.flags import StageResolver
        from dualwrite.instruments import REGISTRY

        def misses() -> float:
            return REGISTRY.get_sample_value("dualwrite_stage_cache_misses_total") or 0.0

        before = misses()
        resolver = StageResolver(engine.redis, engine.keys, engine.settings.flags)
        for customer in ("cus_gc_a", "cus_gc_b", "cus_gc_c"):
            await resolver.resolve(customer)
        assert misses() == before + 3
        del resolver
        gc.collect()
        assert misses() == before + 3
        later = StageResolver(engine.redis, engine.keys, engine.settings.flags)
        for customer in ("cus_gc_d", "cus_gc_e"):
            await later.resolve(customer)
        assert misses() == before + 5
