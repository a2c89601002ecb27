"""Secrets never leak: a recognisable Stripe key and report token, through the demo and a fault
scenario, appear in no log record (any level), no report output (table, JSON, CSV, HTML page), no
Redis key or value under the prefix (dead letters included); and errors shown to callers carry no
internal detail (no stack trace, no Redis address, no file path)."""

from __future__ import annotations

import asyncio
import io
import logging
import types
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from pydantic import SecretStr
from rich.console import Console

import dualwrite.demo
from dualwrite.config import Settings
from dualwrite.demo import DemoOptions, run_demo
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import StageResolver
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import Stage
from dualwrite.proxy import create_proxy_app
from dualwrite.report import build_report, render_csv, render_table
from dualwrite.testing import RunningStandin, StripeStandin
from dualwrite.web import report_app
from tests.proxy.test_proxy import prefix_values
from tests.routes.test_fuzz_routes import usage_app
from tests.support import EVENT_NAME, ScenarioBuilder, make_settings, set_stage

CANARY_KEY = "sk_test_LEAKCANARYkey0000000000000000000001"
WRONG_KEY = "sk_test_LEAKCANARYwrong00000000000000000002"
CANARY_TOKEN = "LEAKCANARYtoken-0000000000000000000000003"
WRONG_TOKEN = "LEAKCANARYwrongtoken-000000000000000000004"
#: Every secret above contains this, so one search finds any of them (or a slice of one).
MARKER = "LEAKCANARY"
INTERNALS = ("Traceback", "redis://", "/work/", ".py", "site-packages", "127.0.0.1:1")


def canary_settings(redis_url: str, prefix: str, api_base: str, **sections: object) -> Settings:
    """Settings holding the canary key and report token."""
    return make_settings(
        redis_url=redis_url,
        prefix=prefix,
        api_base=api_base,
        api_key=CANARY_KEY,
        DUALWRITE_REPORT_TOKEN=SecretStr(CANARY_TOKEN),  # type: ignore[arg-type]
        **sections,  # type: ignore[arg-type]
    )


async def report_outputs(settings: Settings) -> list[str]:
    """The report as a table, JSON and CSV, and the HTML pages (overview, flags, each customer)."""
    engine = DualWriteEngine.from_settings(settings)
    try:
        resolver = StageResolver(engine.redis, engine.keys, settings.flags)
        report = await build_report(engine.ledger, resolver, outbox=engine.outbox)
        buffer = io.StringIO()
        Console(file=buffer, width=200).print(render_table(report))
        outputs = [buffer.getvalue(), report.model_dump_json(), render_csv(report)]
        app = report_app(settings, engine=engine)
        auth = {"Authorization": f"Bearer {CANARY_TOKEN}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            pages = ["/", "/flags", *(f"/customers/{c.customer}" for c in report.customers)]
            for path in pages:
                response = await client.get(path, headers=auth)
                assert response.status_code == 200, (path, response.status_code)
                outputs.append(response.text)
            refused = await client.get("/", headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
            assert refused.status_code == 401
            outputs.append(refused.text + str(refused.headers))
    finally:
        await engine.aclose()
    return outputs


def assert_no_secret(where: str, texts: list[str]) -> None:
    """None of ``texts`` holds the canary."""
    leaks = [text[max(0, text.find(MARKER) - 80) :][:200] for text in texts if MARKER in text]
    assert leaks == [], f"a secret leaked into {where}: {leaks[:3]}"


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured record, formatted with its arguments, exception and stack."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in caplog.records]


class TestDemo:
    """The demo, with the canary as its Stripe key, leaks it nowhere."""

    def test_demo_leaks_no_key_or_token(
        self, caplog, monkeypatch, redis_url, key_prefix, standin_url
    ):
        """Logs (DEBUG up), its printed report, Redis, and every report output: no canary."""
        caplog.set_level(logging.DEBUG)
        # The demo mints its stand-in's key from secrets.token_hex: make that the canary, and run
        # under this test's prefix so it never meets test_demo's keys.
        canary_secrets = types.SimpleNamespace(token_hex=lambda n: MARKER + "0" * (2 * n - 10))
        monkeypatch.setattr(dualwrite.demo, "secrets", canary_secrets)
        monkeypatch.setattr(dualwrite.demo, "DEMO_PREFIX", key_prefix)
        buffer = io.StringIO()
        settings = canary_settings(redis_url, key_prefix, standin_url)
        options = DemoOptions(customers_per_stage=1, events=40, seed=5, fault_rate=0.2)
        asyncio.run(run_demo(settings, options, console=Console(file=buffer, width=200)))
        values = asyncio.run(prefix_values(redis_url, key_prefix))
        assert any(":dead" in value or "divergence" in value for value in values)
        outputs = asyncio.run(report_outputs(settings))
        assert_no_secret("the logs", log_texts(caplog))
        assert_no_secret("the demo's output", [buffer.getvalue()])
        assert_no_secret("Redis", values)
        assert_no_secret("the report", outputs)


@pytest.fixture
def canary_standin(standin_server: RunningStandin) -> StripeStandin:
    """A fresh stand-in that accepts only the canary key."""
    fresh = StripeStandin(api_keys=[CANARY_KEY])
    standin_server.swap(fresh)
    return fresh


@pytest.fixture
async def canary_engine(
    redis_url: str, key_prefix: str, standin_server: RunningStandin, canary_standin: StripeStandin
) -> AsyncIterator[DualWriteEngine]:
    """An engine with the canary key (no background worker)."""
    settings = canary_settings(
        redis_url,
        key_prefix,
        standin_server.url,
        stripe={"request_retries": 0, "timeout": 0.5},
        outbox={"max_age_seconds": 60},
    )
    engine = DualWriteEngine.from_settings(settings)
    await engine.start(worker=False)
    yield engine
    await engine.aclose()


@pytest.mark.anyio
class TestFaultScenario:
    """Usage through the proxy while Stripe fails 30 % of calls and refuses some for good."""

    async def test_faults_leak_no_key_or_token(
        self, caplog, canary_engine, canary_standin, standin_server, redis_url, key_prefix
    ):
        """Retries, dead letters, divergence, wrong keys: no canary in logs, Redis or reports."""
        caplog.set_level(logging.DEBUG)
        engine, standin = canary_engine, canary_standin
        builder = ScenarioBuilder(standin_server.url, CANARY_KEY)
        scenarios = [await builder.customer(stage.value) for stage in Stage]
        await builder.aclose()
        for scenario, stage in zip(scenarios, Stage, strict=True):
            await set_stage(engine, scenario.customer, stage)
        from dualwrite.config import MeterMapping

        meter = MeterMapping(event_name=EVENT_NAME, legacy_prices=(scenarios[0].legacy_price,))
        settings = engine.settings.model_copy(update={"meters": (meter,)})
        app = create_proxy_app(settings, engine=engine)
        standin.faults.configure(rate=0.3, kinds=("500", "429", "timeout"), timeout_seconds=0.8)
        standin.faults.refuse(  # the shadow customer's meter events: dead letters, divergence
            path="/v1/billing/meter_events",
            where={"payload[stripe_customer_id]": scenarios[1].customer},
            status=400,
            message="Refused for good.",
        )
        auth = {"Authorization": f"Bearer {CANARY_KEY}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://p", timeout=10) as http:
            for index in range(40):
                scenario = scenarios[index % len(scenarios)]
                path = f"/v1/subscription_items/{scenario.item}/usage_records"
                headers = {**auth, "Idempotency-Key": f"canary-{index}"}
                for _ in range(8):  # retried as an SDK retries: same key
                    response = await http.post(path, data={"quantity": "2"}, headers=headers)
                    if response.status_code < 500 and response.status_code != 429:
                        break
                assert MARKER not in response.text
            wrong = await http.post(
                f"/v1/subscription_items/{scenarios[1].item}/usage_records",
                data={"quantity": "1"},
                headers={"Authorization": f"Bearer {WRONG_KEY}"},
            )
            assert wrong.status_code == 401 and MARKER not in wrong.text
        standin.faults.configure(rate=0.0)  # random faults off; the refusal rule stays
        worker = engine.new_worker()
        with anyio.fail_after(30):
            await worker.drain()
        await app.aclose()
        values = await prefix_values(redis_url, key_prefix)
        assert any(":dead" in value for value in values)
        assert_no_secret("the logs", log_texts(caplog))
        assert_no_secret("Redis", values)
        assert_no_secret("the report", await report_outputs(settings))


@pytest.mark.anyio
class TestCallerErrorsHideInternals:
    """What a caller sees on an outage or an internal error holds no internal detail."""

    async def test_redis_outage(self, standin_url):
        """Redis down: health is a bare 503; the report page and usage answer without detail."""
        settings = canary_settings(
            "redis://:hunter2LEAKCANARY@127.0.0.1:1/0",
            "dwtest-down",
            standin_url,
            redis={"connect_timeout": 0.2, "socket_timeout": 0.2},
            routes=(
                {
                    "method": "POST",
                    "path": "/usage/{customer}",
                    "customer": "path:customer",
                    "quantity": "json:usage.quantity",
                    "event_name": f"const:{EVENT_NAME}",
                },
            ),
        )
        proxy = create_proxy_app(settings)
        texts = []
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=proxy), base_url="http://p"
        ) as client:
            health = await client.get("/_dualwrite/health")
            assert health.status_code == 503
            texts.append(health.text)
            page = await client.get(
                "/_dualwrite/", headers={"Authorization": f"Bearer {CANARY_TOKEN}"}
            )
            assert page.status_code == 503, page.status_code
            texts.append(page.text)
        await proxy.aclose()
        middleware = DualWriteMiddleware(usage_app(), config=settings)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=middleware), base_url="http://a"
        ) as client:
            usage = await client.post("/usage/cus_x", json={"usage": {"quantity": 1}})
            assert usage.status_code == 400  # the safe stage (legacy) needs a subscription item
            texts.append(usage.text)
        await middleware.aclose()
        for text in texts:
            assert MARKER not in text and "hunter2" not in text
            for detail in INTERNALS:
                assert detail not in text, (detail, text[:300])

    async def test_internal_error_is_generic(self, redis_url, key_prefix, standin_url, monkeypatch):
        """A bug inside the report page: 500 with a generic body, no traceback or path."""
        settings = canary_settings(redis_url, key_prefix, standin_url)
        proxy = create_proxy_app(settings)

        async def broken(*args: object, **kwargs: object) -> None:
            msg = f"internal failure at {redis_url} in /work/main/dualwrite/ledger.py"
            raise RuntimeError(msg)

        # The report reads the rollup copies (rolled); other pages read rows.
        monkeypatch.setattr("dualwrite.ledger.Ledger.rows", broken)
        monkeypatch.setattr("dualwrite.ledger.Ledger.rolled", broken)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=proxy, raise_app_exceptions=False),
            base_url="http://p",
        ) as client:
            response = await client.get(
                "/_dualwrite/", headers={"Authorization": f"Bearer {CANARY_TOKEN}"}
            )
        await proxy.aclose()
        assert response.status_code == 500
        for detail in INTERNALS:
            assert detail not in response.text, (detail, response.text[:300])
