"""DualWriteMiddleware in front of a small Starlette app, driven through httpx.ASGITransport."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import RecordOutcome, Stage
from dualwrite.outbox import OutboxWorker
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, make_settings, set_stage

pytestmark = pytest.mark.anyio

USAGE_ROUTE = {
    "method": "POST",
    "path": "/usage/{customer}",
    "customer": "path:customer",
    "subscription_item": "json:item",
    "quantity": "json:quantity",
    "event_name": f"const:{EVENT_NAME}",
}


def build_app(calls: list[str]) -> Starlette:
    """A tiny app: a usage endpoint reading request.state.dualwrite, plus other routes."""

    async def usage(request: Request) -> JSONResponse:
        outcome: RecordOutcome = request.state.dualwrite
        body = await request.json()
        calls.append("usage")
        return JSONResponse(
            {"stage": outcome.stage.value, "id": outcome.authoritative.stripe_id, "echo": body}
        )

    async def hello(request: Request) -> PlainTextResponse:
        calls.append("hello")
        return PlainTextResponse("hello")

    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for index in range(5):
                yield f"chunk {index}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    async def echo_socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    return Starlette(
        routes=[
            Route("/usage/{customer}", usage, methods=["POST"]),
            Route("/hello", hello),
            Route("/stream", stream),
            WebSocketRoute("/ws", echo_socket),
        ]
    )


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str) -> Settings:
    """Settings with one usage route."""
    return make_settings(
        redis_url=redis_url,
        prefix=key_prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        routes=(USAGE_ROUTE,),
    )


@pytest.fixture
async def scenario(standin_url: str) -> AsyncIterator[Scenario]:
    """A customer on a legacy metered price."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    yield await builder.customer()
    await builder.aclose()


@pytest.fixture
async def client(engine: DualWriteEngine) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    """An httpx client on the wrapped app, and the list of app handlers called."""
    calls: list[str] = []
    app = DualWriteMiddleware(build_app(calls), engine=engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        yield http, calls


async def prefix_keys(engine: DualWriteEngine) -> list[str]:
    """Every Redis key under the engine's prefix."""
    return [
        key async for key in engine.redis.scan_iter(match=f"{engine.keys.prefix}:*", count=10_000)
    ]


class TestUsageRoutes:
    """Usage requests are recorded before the app runs, which sees the outcome."""

    async def test_usage_request_is_recorded_and_app_sees_outcome(self, client, scenario, standin):
        """The app gets request.state.dualwrite and the body it was sent."""
        http, calls = client
        response = await http.post(
            f"/usage/{scenario.customer}", json={"item": scenario.item, "quantity": 12}
        )
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["stage"] == "legacy" and data["id"].startswith("mbur_")
        assert data["echo"] == {"item": scenario.item, "quantity": 12}
        assert calls == ["usage"]
        assert standin.legacy_total(scenario.item) == 12

    async def test_shadow_customer_gets_both_legs(self, client, engine, scenario, standin):
        """At shadow, the outbox writes the meter event after the response."""
        http, _ = client
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        response = await http.post(
            f"/usage/{scenario.customer}",
            json={"item": scenario.item, "quantity": 3},
            headers={"Idempotency-Key": "mw-1"},
        )
        assert response.status_code == 200
        with anyio.fail_after(10):
            await OutboxWorker(engine.outbox, engine.writer).drain()
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 3

    async def test_idempotency_key_retry_writes_once(self, client, scenario, standin):
        """Three posts with one Idempotency-Key: one usage record."""
        http, calls = client
        for _ in range(3):
            response = await http.post(
                f"/usage/{scenario.customer}",
                json={"item": scenario.item, "quantity": 2},
                headers={"Idempotency-Key": "same-key"},
            )
            assert response.status_code == 200
        assert standin.legacy_total(scenario.item) == 2
        assert calls == ["usage"] * 3

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"item": "si_x", "quantity": "ten"}, "quantity"),
            ({"item": "si_x", "quantity": -1}, "quantity"),
            ({"item": "si_x", "quantity": 1.5}, "quantity"),
            ({"item": "si_x"}, "quantity"),
            ({"item": 12, "quantity": 1}, "item"),
        ],
    )
    async def test_malformed_usage_is_400_and_writes_nothing(
        self, client, engine, scenario, standin, body, param
    ):
        """A bad field gets Stripe's error shape naming it; no Stripe call, no Redis key."""
        http, calls = client
        standin.reset_requests()
        before = await prefix_keys(engine)
        response = await http.post(f"/usage/{scenario.customer}", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert error["message"]
        assert calls == [] and standin.requests == []
        assert await prefix_keys(engine) == before

    async def test_not_json_is_400(self, client, scenario):
        """A body that is not JSON is refused."""
        http, _ = client
        response = await http.post(
            f"/usage/{scenario.customer}",
            content=b"{nope",
            headers={"content-type": "application/json"},
        )
        assert (
            response.status_code == 400
            and response.json()["error"]["type"] == "invalid_request_error"
        )

    async def test_huge_body_is_413(self, client, scenario, standin):
        """A body over the route's limit is refused before parsing."""
        http, calls = client
        standin.reset_requests()
        response = await http.post(f"/usage/{scenario.customer}", content=b"x" * 70_000)
        assert response.status_code == 413 and calls == [] and standin.requests == []

    async def test_stripe_refusal_returns_stripes_status_and_error(self, client, scenario, standin):
        """An authoritative refusal is handed back as Stripe sent it; the app is not called."""
        http, calls = client
        standin.faults.refuse(
            path=r"/v1/subscription_items/.*/usage_records",
            status=402,
            type="card_error",
            code="card_declined",
            message="Declined for the test.",
        )
        response = await http.post(
            f"/usage/{scenario.customer}", json={"item": scenario.item, "quantity": 1}
        )
        assert response.status_code == 402
        assert response.json()["error"] == {
            "type": "card_error",
            "code": "card_declined",
            "message": "Declined for the test.",
        }
        assert calls == []

    async def test_timestamp_now_is_fixed_once(self, client, scenario, standin):
        """Without a timestamp, the event carries the intercept time."""
        http, _ = client
        before = int(time.time())
        await http.post(f"/usage/{scenario.customer}", json={"item": scenario.item, "quantity": 1})
        [record] = standin.usage_records(scenario.item)
        assert before <= record["timestamp"] <= int(time.time())


class TestPassThrough:
    """Everything that is not a usage route reaches the app untouched."""

    async def test_other_routes_pass_through(self, client, standin):
        """A plain GET is answered by the app, with no Stripe call."""
        http, calls = client
        standin.reset_requests()
        response = await http.get("/hello")
        assert response.text == "hello" and calls == ["hello"] and standin.requests == []

    async def test_wrong_method_on_usage_path_passes_through(self, client, scenario):
        """GET on the usage path is not a usage route: the app answers (405 here)."""
        http, calls = client
        response = await http.get(f"/usage/{scenario.customer}")
        assert response.status_code == 405 and calls == []

    async def test_streaming_response_streams(self, client):
        """A streaming response arrives chunk by chunk."""
        http, _ = client
        async with http.stream("GET", "/stream") as response:
            chunks = [chunk async for chunk in response.aiter_text()]
        assert "".join(chunks) == "".join(f"chunk {i}\n" for i in range(5))

    def test_websocket_passes_through(self, settings):
        """A websocket is served by the app as without the middleware."""
        app = DualWriteMiddleware(build_app([]), config=settings)
        with TestClient(app) as http, http.websocket_connect("/ws") as socket:
            socket.send_text("ping")
            assert socket.receive_text() == "ping"


class TestLifespan:
    """The middleware starts the engine's worker with the app and stops it with the app."""

    def test_worker_runs_inside_the_lifespan(self, settings, standin, standin_url):
        """A shadow customer's meter event is delivered by the in-process worker."""
        import asyncio

        scenario = asyncio.run(_make_scenario(standin_url))
        app = DualWriteMiddleware(build_app([]), config=settings)
        with TestClient(app) as http:
            assert http.portal is not None
            http.portal.call(set_stage, app.engine, scenario.customer, Stage.SHADOW)
            assert app.engine.worker is not None
            response = http.post(
                f"/usage/{scenario.customer}", json={"item": scenario.item, "quantity": 6}
            )
            assert response.status_code == 200
            deadline = time.monotonic() + 10
            while standin.meter_total(scenario.customer, EVENT_NAME) < 6:
                assert time.monotonic() < deadline, "the worker did not deliver the shadow write"
                time.sleep(0.02)
        assert app.engine.worker is None
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 6


async def _make_scenario(url: str) -> Scenario:
    builder = ScenarioBuilder(url, STRIPE_KEY)
    try:
        return await builder.customer()
    finally:
        await builder.aclose()


class TestRedisDown:
    """Redis unreachable: the app still answers, at the safe stage."""

    async def test_app_answers_when_redis_is_down(self, standin_url, scenario, standin):
        """Usage goes to the legacy leg (safe stage); other routes are unaffected."""
        settings = make_settings(
            redis_url="redis://127.0.0.1:1/0",
            prefix="dwtest-down",
            api_base=standin_url,
            api_key=STRIPE_KEY,
            routes=(USAGE_ROUTE,),
            redis={"socket_timeout": 0.2, "connect_timeout": 0.2},
        )
        calls: list[str] = []
        app = DualWriteMiddleware(build_app(calls), config=settings)
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                usage = await http.post(
                    f"/usage/{scenario.customer}", json={"item": scenario.item, "quantity": 4}
                )
                hello = await http.get("/hello")
        finally:
            await app.aclose()
        assert usage.status_code == 200 and usage.json()["stage"] == "legacy"
        assert hello.text == "hello"
        assert standin.legacy_total(scenario.item) == 4
