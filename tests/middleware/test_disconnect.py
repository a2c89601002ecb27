"""A caller that disconnects before its body is complete records nothing, at both front doors.

The ASGI server hands the app what arrived (``quantity=1`` with ``more_body``), then
``http.disconnect``: the body is incomplete, so neither the middleware nor the proxy may turn it into
usage (a form body cut after ``quantity=1`` could have been ``quantity=12``).
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from dualwrite.config import MeterMapping, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.proxy import create_proxy_app, serve_proxy
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, make_settings

pytestmark = pytest.mark.anyio

FORM = b"application/x-www-form-urlencoded"
FORM_ROUTE = {
    "method": "POST",
    "path": "/usage/{customer}",
    "customer": "path:customer",
    "subscription_item": "form:item",
    "quantity": "form:quantity",
    "event_name": f"const:{EVENT_NAME}",
}


@pytest.fixture
async def scenario(builder: ScenarioBuilder) -> Scenario:
    """A customer on the legacy metered price."""
    return await builder.customer()


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str, scenario: Scenario) -> Settings:
    """One form usage route (the middleware), and a meter mapping the legacy price (the proxy)."""
    made = make_settings(
        redis_url=redis_url,
        prefix=key_prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        routes=(FORM_ROUTE,),
    )
    meter = MeterMapping(event_name=EVENT_NAME, legacy_prices=(scenario.legacy_price,))
    return made.model_copy(update={"meters": (meter,)})


def http_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An HTTP scope as an ASGI server builds one (the body arrives through ``receive``)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


async def send_then_disconnect(app: ASGIApp, scope: dict[str, Any], first: bytes) -> list[Message]:
    """Drive ``app``: ``first`` with more to come, then a disconnect; returns what it sent."""
    incoming: list[Message] = [{"type": "http.request", "body": first, "more_body": True}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return sent


async def stored_keys(engine: DualWriteEngine) -> set[str]:
    """Every Redis key under the engine's prefix."""
    return {
        key async for key in engine.redis.scan_iter(match=f"{engine.keys.prefix}:*", count=10_000)
    }


def nothing_written(standin: StripeStandin, scenario: Scenario) -> bool:
    """Neither a usage record nor a meter event reached Stripe for the scenario."""
    return not standin.usage_records(scenario.item) and not standin.meter_events(scenario.customer)


class TestMiddleware:
    """``DualWriteMiddleware`` with a form usage route."""

    async def test_partial_form_body_records_nothing(self, engine, scenario, standin):
        """``quantity=1`` then a disconnect: no usage, no Redis key, the app is not called."""
        calls: list[str] = []

        async def usage(request: Request) -> PlainTextResponse:
            calls.append("usage")
            return PlainTextResponse("recorded")

        app = DualWriteMiddleware(
            Starlette(routes=[Route("/usage/{customer}", usage, methods=["POST"])]),
            engine=engine,
        )
        standin.reset_requests()
        before = await stored_keys(engine)
        scope = http_scope(
            f"/usage/{scenario.customer}",
            [(b"content-type", FORM), (b"content-length", b"64")],
        )
        body = f"item={scenario.item}&quantity=1".encode()
        sent = await send_then_disconnect(app, scope, body)
        assert sent == []  # nobody is left to answer
        assert calls == []
        assert standin.requests == [] and nothing_written(standin, scenario)
        assert await stored_keys(engine) == before


class TestProxy:
    """The proxy's usage-record interception."""

    async def test_partial_usage_record_records_nothing(self, engine, settings, scenario, standin):
        """``quantity=1`` then a disconnect, in process: nothing is forwarded or recorded."""
        app = create_proxy_app(settings, engine=engine)
        try:
            standin.reset_requests()
            before = await stored_keys(engine)
            scope = http_scope(
                f"/v1/subscription_items/{scenario.item}/usage_records",
                [
                    (b"authorization", f"Bearer {STRIPE_KEY}".encode()),
                    (b"content-type", FORM),
                    (b"content-length", b"64"),
                ],
            )
            sent = await send_then_disconnect(app, scope, b"quantity=1")
        finally:
            await app.aclose()
        assert sent == []
        assert standin.requests == [] and nothing_written(standin, scenario)
        assert await stored_keys(engine) == before

    async def test_partial_usage_record_over_a_socket(self, settings, scenario, standin):
        """The same over a real connection: the client closes after ``quantity=1``; a complete
        request afterwards is the only usage recorded."""
        path = f"/v1/subscription_items/{scenario.item}/usage_records"
        with serve_proxy(settings) as proxy:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {STRIPE_KEY}\r\n"
                f"Content-Type: {FORM.decode()}\r\nContent-Length: 64\r\n\r\n"
            ).encode()
            with socket.create_connection((proxy.host, proxy.port), timeout=10) as conn:
                conn.sendall(head + b"quantity=1")
                await anyio.sleep(0.2)  # the proxy has read the partial body and waits for more
            async with await anyio.connect_tcp(proxy.host, proxy.port) as stream:
                body = b"quantity=5&timestamp=now"
                await stream.send(
                    head.replace(b"Content-Length: 64", f"Content-Length: {len(body)}".encode())
                    + body
                )
                reply = await stream.receive()
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        records = standin.usage_records(scenario.item)
        assert [record["quantity"] for record in records] == [5]
