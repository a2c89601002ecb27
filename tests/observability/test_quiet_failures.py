"""Failures an operator must hear about, once and plainly: a middleware without STRIPE_API_KEY
(a warning at start, and callers never see the server's configuration), a dead-lettered shadow
write (logged once with its reason), and a Redis outage (lines, not tracebacks)."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from dualwrite.engine import DualWriteEngine
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import Stage
from dualwrite.outbox import OutboxWorker
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.middleware.test_middleware import USAGE_ROUTE
from tests.support import (
    ScenarioBuilder,
    make_settings,
    refuse_meter_event,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio


def app_with(middleware_settings) -> DualWriteMiddleware:
    """A one-route app behind the middleware."""

    async def usage_endpoint(request) -> PlainTextResponse:
        return PlainTextResponse("recorded")

    inner = Starlette(routes=[Route("/usage/{customer}", usage_endpoint, methods=["POST"])])
    return DualWriteMiddleware(inner, config=middleware_settings)


async def post_usage(app: DualWriteMiddleware) -> httpx.Response:
    """One usage request through ``app``, which is closed afterwards."""
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post("/usage/cus_1", json={"item": "si_1", "quantity": 3})
    finally:
        await app.aclose()


class TestMiddlewareWithoutKey:
    """No STRIPE_API_KEY: warned at start; callers get a 503 that says nothing of the server."""

    async def test_warning_at_start_and_a_plain_503(
        self, redis_url, key_prefix, standin_url, caplog
    ):
        """The warning names the variable; the caller's error body does not, nor the SDK's hint."""
        settings = make_settings(
            redis_url=redis_url,
            prefix=key_prefix,
            api_base=standin_url,
            api_key=None,
            routes=(USAGE_ROUTE,),
        )
        with caplog.at_level(logging.WARNING, logger="dualwrite"):
            app = app_with(settings)
        assert any("STRIPE_API_KEY is not set" in r.getMessage() for r in caplog.records)
        response = await post_usage(app)
        assert response.status_code == 503
        body = response.text
        assert response.json()["error"]["type"] == "api_error"
        for secret_of_the_server in ("STRIPE_API_KEY", "api_key", "API key", "stripe.api_key"):
            assert secret_of_the_server not in body

    async def test_a_refused_server_key_is_not_shown(
        self, redis_url, key_prefix, standin_url, standin: StripeStandin
    ):
        """Stripe refusing the server's own key (401) is a 503 to the caller, the key unnamed."""
        settings = make_settings(
            redis_url=redis_url,
            prefix=key_prefix,
            api_base=standin_url,
            api_key="sk_test_notTheStandinsKey000000000000000",
            routes=(USAGE_ROUTE,),
        )
        app = app_with(settings)
        response = await post_usage(app)
        assert response.status_code == 503, response.text
        assert "sk_test_" not in response.text and "API Key" not in response.text


class TestDeadLetterLogged:
    """A dead-lettered shadow write is logged once, with its reason and Stripe's error."""

    async def test_logged_once(self, standin_settings, standin_url, standin, caplog):
        """Stripe refuses the shadow meter event for good: one warning naming it and why."""
        async with (
            ScenarioBuilder(standin_url, STRIPE_KEY) as builder,
            DualWriteEngine.from_settings(
                standin_settings(outbox={"run_in_process": False})
            ) as engine,
        ):
            scenario = await builder.customer("refused")
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            refuse_meter_event(standin, scenario.customer, 7)
            event = usage(scenario, 7)
            assert (await engine.record(event)).accepted
            with caplog.at_level(logging.INFO, logger="dualwrite"):
                worker = OutboxWorker(engine.outbox, engine.writer)
                await worker.drain()
                await worker.drain()
        lines = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        message = lines[0].getMessage()
        assert lines[0].levelno == logging.WARNING
        assert event.identifier in message and scenario.customer in message
        assert "(refused, " in message and "refused by the test" in message


class TestRedisOutage:
    """An expected Redis outage logs lines, never a traceback."""

    async def test_no_traceback(self, key_prefix, standin_url, caplog):
        """Usage recorded while Redis is down (spooled): no log record carries a traceback."""
        settings = make_settings(
            redis_url="redis://:s3cret@127.0.0.1:1/0",
            prefix=key_prefix,
            api_base=standin_url,
            api_key=STRIPE_KEY,
            redis={"connect_timeout": 0.2, "socket_timeout": 0.2},
            outbox={"run_in_process": False},
        )
        async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
            scenario = await builder.customer("outage")
        with caplog.at_level(logging.INFO, logger="dualwrite"):
            async with DualWriteEngine.from_settings(settings) as engine:
                await engine.start(worker=False)
                assert (await engine.record(usage(scenario, 2))).accepted
        assert any("spooled" in r.getMessage() for r in caplog.records)
        with_traceback = [r.getMessage() for r in caplog.records if r.exc_info]
        assert with_traceback == []
        assert "s3cret" not in caplog.text
