"""Access: the report page, the admin API and /metrics refuse missing or wrong tokens (compared in
constant time); the proxy forwards to its upstream only, whatever the request names (Host,
absolute-form targets, X-Forwarded-Host, Forwarded, path tricks), checked with raw sockets against
a served proxy while a second local server stands in for "evil" and must receive nothing."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from pydantic import SecretStr

import dualwrite._bearer
import dualwrite.web._auth
from dualwrite.config import Settings
from dualwrite.proxy import RunningProxy, create_proxy_app, serve_proxy
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.support import make_settings

pytestmark = pytest.mark.anyio

REPORT_TOKEN = "report-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef0"
METRICS_TOKEN = "metrics-token-0123456789abcdef"


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """Proxy settings with all three tokens configured."""
    return standin_settings(
        DUALWRITE_REPORT_TOKEN=SecretStr(REPORT_TOKEN),
        DUALWRITE_ADMIN_TOKEN=SecretStr(ADMIN_TOKEN),
        DUALWRITE_METRICS_TOKEN=SecretStr(METRICS_TOKEN),
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The proxy app in-process (its report page, admin API and metrics)."""
    app = create_proxy_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
        yield http
    await app.aclose()


ENDPOINTS = [
    ("/_dualwrite/", REPORT_TOKEN),
    ("/_dualwrite/flags", REPORT_TOKEN),
    ("/_dualwrite/admin/openapi.json", ADMIN_TOKEN),
    ("/metrics", METRICS_TOKEN),
]


class TestTokens:
    """Each protected endpoint answers only to its own token."""

    @pytest.mark.parametrize(("path", "token"), ENDPOINTS)
    async def test_missing_wrong_and_right(self, client, standin, path, token):
        """No token: 401; a wrong one, a prefix of it, another endpoint's: 401; its own: 200."""
        others = {REPORT_TOKEN, ADMIN_TOKEN, METRICS_TOKEN} - {token}
        wrong = [token[:-1], token + "x", token.upper(), "", *others]
        assert (await client.get(path)).status_code == 401
        for candidate in wrong:
            response = await client.get(path, headers={"Authorization": f"Bearer {candidate}"})
            assert response.status_code == 401, (path, candidate)
            assert token not in response.text
        basic = await client.get(path, headers={"Authorization": f"Basic {token}"})
        assert basic.status_code == 401
        ok = await client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200, (path, ok.text[:200])
        assert standin.requests == []  # never forwarded to Stripe

    async def test_no_token_configured_is_403(self, redis_url, key_prefix, standin_url):
        """Without DUALWRITE_REPORT_TOKEN / DUALWRITE_ADMIN_TOKEN every request is refused."""
        bare = make_settings(
            redis_url=redis_url, prefix=key_prefix, api_base=standin_url, api_key=STRIPE_KEY
        )
        app = create_proxy_app(bare)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
            for path in ("/_dualwrite/", "/_dualwrite/admin/openapi.json"):
                response = await http.get(path, headers={"Authorization": "Bearer anything-at-all"})
                assert response.status_code == 403, path
        await app.aclose()

    def test_comparisons_are_constant_time(self):
        """Both gates compare credentials with hmac.compare_digest, never ``==``."""
        for module in (dualwrite.web._auth, dualwrite._bearer):
            source = inspect.getsource(module)
            assert "hmac.compare_digest(" in source, module.__name__
            assert "== self._token" not in source and "self._token ==" not in source


# ------------------------------------------------------------------------------- the open proxy


@dataclass
class Evil:
    """A TCP server that records every connection and every byte it receives."""

    port: int = 0
    connections: int = 0
    received: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Record, answer 200 (so a proxy that reached it would look successful), close."""
        self.connections += 1
        with contextlib.suppress(TimeoutError):
            self.received.append(await asyncio.wait_for(reader.read(65536), 2))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nEVIL!")
        await writer.drain()
        writer.close()


@pytest.fixture
async def evil() -> AsyncIterator[Evil]:
    """The "evil" server on loopback."""
    target = Evil()
    server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    target.port = server.sockets[0].getsockname()[1]
    yield target
    server.close()
    await server.wait_closed()


@pytest.fixture
def served(settings: Settings) -> Iterator[RunningProxy]:
    """The proxy on a real socket."""
    with serve_proxy(settings) as running:
        yield running


async def raw_request(proxy: RunningProxy, head: str) -> bytes:
    """Send one raw HTTP/1.1 request head; return everything the proxy answers."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(head.encode("latin-1") + b"Connection: close\r\n\r\n")
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def tricks(evil: str) -> list[str]:
    """Request heads that try to make the proxy talk to ``evil`` (host:port)."""
    auth = f"Authorization: Bearer {STRIPE_KEY}\r\n"
    return [
        f"GET /v1/customers HTTP/1.1\r\nHost: {evil}\r\n{auth}",
        f"GET http://{evil}/v1/customers HTTP/1.1\r\nHost: {evil}\r\n{auth}",
        f"GET https://{evil}/v1/customers HTTP/1.1\r\nHost: {evil}\r\n{auth}",
        f"GET http://{evil}@127.0.0.1/v1/customers HTTP/1.1\r\nHost: x\r\n{auth}",
        f"GET /v1/customers HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: {evil}\r\n"
        f"X-Forwarded-Proto: http\r\nX-Forwarded-Port: {evil.split(':')[1]}\r\n{auth}",
        f"GET /v1/customers HTTP/1.1\r\nHost: x\r\nForwarded: host={evil};proto=http\r\n{auth}",
        f"GET //{evil}/v1/customers HTTP/1.1\r\nHost: x\r\n{auth}",
        f"GET ///{evil}/v1/customers HTTP/1.1\r\nHost: x\r\n{auth}",
        f"GET /..%2f..%2f{evil}/v1/customers HTTP/1.1\r\nHost: x\r\n{auth}",
        f"GET /%2F%2F{evil}/v1/customers HTTP/1.1\r\nHost: x\r\n{auth}",
        f"GET /@{evil}/v1/customers HTTP/1.1\r\nHost: x\r\n{auth}",
        f"GET /v1/customers@{evil} HTTP/1.1\r\nHost: x\r\n{auth}",
        f"GET \\\\{evil}\\v1\\customers HTTP/1.1\r\nHost: x\r\n{auth}",
        f"GET {evil}/v1/customers HTTP/1.1\r\nHost: x\r\n{auth}",
        f"CONNECT {evil} HTTP/1.1\r\nHost: {evil}\r\n{auth}",
        f"OPTIONS * HTTP/1.1\r\nHost: {evil}\r\n{auth}",
        f"POST /v1/subscription_items/si_x/usage_records HTTP/1.1\r\nHost: {evil}\r\n"
        f"X-Forwarded-Host: {evil}\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\n"
        "Content-Length: 10\r\n\r\nquantity=1",
    ]


class TestNeverAnOpenProxy:
    """Whatever a request names, only the configured upstream is ever contacted."""

    async def test_tricks_reach_only_the_upstream(self, served, evil, standin: StripeStandin):
        """Every trick is answered by the upstream (or refused); "evil" gets no connection."""
        netloc = f"127.0.0.1:{evil.port}"
        for head in tricks(netloc):
            if head.startswith("POST"):
                head, _, body = head.partition("\r\n\r\n")
                reply = await raw_request_with_body(served, head + "\r\n", body.encode())
            else:
                reply = await raw_request(served, head)
            status = reply.split(b"\r\n", 1)[0]
            assert status.startswith(b"HTTP/1.1 "), (head, reply[:200])
            assert b"EVIL!" not in reply, head
            assert int(status.split()[1]) < 500 or int(status.split()[1]) == 502, (head, status)
        assert evil.connections == 0, evil.received
        # What was forwarded went to the upstream, evil's name at most as a path segment there.
        assert len(standin.requests) >= 8


async def raw_request_with_body(proxy: RunningProxy, head: str, body: bytes) -> bytes:
    """Send a raw request head and body; return the proxy's answer."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
