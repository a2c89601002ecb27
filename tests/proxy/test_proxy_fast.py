"""The proxy's fast path (``dualwrite.proxy._fast``) over real sockets: reply framing (chunked,
close-delimited, large, cut short), pipelined requests mixing forwarded and intercepted paths,
framing attacks refused before anything reaches the upstream, and the setting that turns it off.

The upstream is a few lines of asyncio that read each request and answer with the bytes a test
chose for its path, so every framing the fast path relays is written out exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from dualwrite.config import Settings
from dualwrite.proxy import HEALTH_PATH, RunningProxy, serve_proxy
from tests.conftest import STRIPE_KEY
from tests.proxy.test_proxy import proxy_settings

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": f"Bearer {STRIPE_KEY}"}
BIG = bytes(range(256)) * 32768  # 8 MiB


def _reply(body: bytes, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", *extra]
    return b"\r\n".join([*head, b"Content-Length: %d" % len(body), b"", body])


@dataclass
class RawUpstream:
    """An upstream answering each path with fixed bytes; ``close`` paths close afterwards."""

    replies: dict[str, bytes]
    close: set[str] = field(default_factory=set)
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until the proxy closes it (or a reply does)."""
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.bodies.append(await reader.readexactly(length) if length else b"")
                path = head.split(b" ")[1].decode().partition("?")[0]
                writer.write(self.replies.get(path, _reply(b'{"ok": true}')))
                await writer.drain()
                if path in self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def upstream(
    replies: dict[str, bytes], *, close: Collection[str] = ()
) -> AsyncIterator[tuple[RawUpstream, str]]:
    """A ``RawUpstream`` on a free port, and its base URL."""
    raw = RawUpstream(replies, set(close))
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield raw, f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def exchange(proxy: RunningProxy, data: bytes, *, within: float = 10.0) -> bytes:
    """Send raw ``data`` and read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within):
            return await reader.read(-1)
    finally:
        writer.close()


@pytest.fixture
def settings_for(redis_url: str, key_prefix: str) -> Callable[..., Settings]:
    """Proxy settings for an upstream base URL."""

    def make(url: str, **sections: Any) -> Settings:
        return proxy_settings(redis_url, key_prefix, url, **sections)

    return make


class TestReplyFraming:
    """Replies relayed with their framing, or cut off the way the caller can see."""

    async def test_chunked_reply(self, settings_for):
        """A chunked reply arrives whole and chunked, its Transfer-Encoding not doubled, without
        the hop-by-hop fields (and those its Connection header names)."""
        chunked = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Request-Id: req_1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
            b'Keep-Alive: timeout=5\r\n\r\n5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n'
        )
        async with upstream({"/v1/chunked": chunked}) as (_, url):
            with serve_proxy(settings_for(url)) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client:
                    reply = await client.get("/v1/chunked")
                    again = await client.get("/v1/chunked")
                raw = await exchange(
                    proxy, b"GET /v1/chunked HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
                )
        assert reply.json() == {"a": 1} and again.json() == {"a": 1}
        assert reply.headers["request-id"] == "req_1"
        assert not {"x-hop", "keep-alive", "connection"} & set(reply.headers)
        assert raw.lower().count(b"transfer-encoding: chunked") == 1
        assert raw.endswith(b"0\r\n\r\n")

    async def test_close_delimited_reply(self, settings_for):
        """A reply without length, ended by the upstream closing, reaches the caller whole (as
        chunks) and the caller's connection stays usable."""
        until_close = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
        async with upstream({"/v1/eof": until_close}, close={"/v1/eof"}) as (raw, url):
            with serve_proxy(settings_for(url)) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client:
                    first = await client.get("/v1/eof")
                    second = await client.get("/v1/eof")
        assert first.text == "all of it" and second.text == "all of it"
        assert raw.connections == 2  # a connection ended by its reply is not reused

    async def test_large_reply_streams(self, settings_for):
        """8 MiB down, with its Content-Length, byte for byte."""
        async with upstream({"/v1/big": _reply(BIG)}) as (_, url):
            with serve_proxy(settings_for(url)) as proxy:
                async with (
                    httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client,
                    client.stream("GET", "/v1/big") as reply,
                ):
                    digest = hashlib.sha256()
                    async for chunk in reply.aiter_raw():
                        digest.update(chunk)
        assert reply.headers["content-length"] == str(len(BIG))
        assert digest.hexdigest() == hashlib.sha256(BIG).hexdigest()

    async def test_upstream_closes_mid_reply(self, settings_for):
        """A reply cut after its head closes the caller's connection short of its length."""
        cut = _reply(b"x" * 1000)[:-900]
        async with upstream({"/v1/cut": cut}, close={"/v1/cut"}) as (_, url):
            with serve_proxy(settings_for(url)) as proxy:
                raw = await exchange(proxy, b"GET /v1/cut HTTP/1.1\r\nHost: p\r\n\r\n")
                async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await client.get("/v1/cut")
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"x" * 100)

    async def test_upstream_closes_before_reply(self, settings_for):
        """No reply at all: 502 in Stripe's shape, and the next call is served."""
        async with upstream({"/v1/gone": b""}, close={"/v1/gone"}) as (_, url):
            with serve_proxy(settings_for(url)) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client:
                    failed = await client.get("/v1/gone")
                    served = await client.get("/v1/customers")
        assert failed.status_code == 502
        assert failed.json()["error"]["type"] == "api_error"
        assert served.status_code == 200


class TestConnections:
    """One caller connection, many requests; upstream connections kept alive."""

    async def test_pipelined_requests_answered_in_order(self, settings_for):
        """Four requests in one write (forwarded, intercepted, forwarded with a body, forwarded)
        get four replies in order."""
        replies = {f"/v1/n{index}": _reply(b'{"n": %d}' % index) for index in range(4)}
        requests = (
            b"GET /v1/n0 HTTP/1.1\r\nHost: p\r\n\r\n"
            + f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: p\r\n\r\n".encode()
            + b"POST /v1/n2 HTTP/1.1\r\nHost: p\r\nContent-Length: 6\r\n\r\nname=x"
            + b"GET /v1/n3 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        )
        async with upstream(replies) as (raw, url):
            with serve_proxy(settings_for(url)) as proxy:
                answer = await exchange(proxy, requests)
                assert proxy.app is not None
                assert proxy.app.pool.open_connections == 1  # the fast path carried them
        assert answer.count(b"HTTP/1.1 200") == 4, answer
        positions = [answer.index(marker) for marker in (b'{"n": 0}', b'"status"', b'{"n": 2}')]
        assert positions == sorted(positions) and answer.endswith(b'{"n": 3}')
        assert raw.bodies[1] == b"name=x"
        assert raw.connections == 1  # the forwarded ones shared a kept-alive connection

    async def test_fast_path_can_be_turned_off(self, settings_for):
        """``[proxy] fast_path = false``: forwarded requests take the ASGI path, as before."""
        async with upstream({}) as (raw, url):
            with serve_proxy(settings_for(url, proxy={"fast_path": False})) as proxy:
                async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as client:
                    reply = await client.get("/v1/customers")
                assert proxy.app is not None
                assert proxy.app.pool.open_connections == 0
        assert reply.json() == {"ok": True}
        assert raw.connections == 1


class TestSmuggling:
    """Ambiguous framing gets 400 and the connection closed; the upstream sees nothing."""

    @pytest.mark.parametrize(
        "head",
        [
            b"Content-Length: 6\r\nTransfer-Encoding: chunked",
            b"Content-Length: 6\r\nContent-Length: 7",
            b"Content-Length: six",
            b"Content-Length: -6",
            b"Transfer-Encoding: chunked, identity",
            b"Content-Length : 6",
        ],
    )
    async def test_refused(self, settings_for, head: bytes):
        """Both lengths, two lengths, a length that is no number, an unknown coding: 400."""
        async with upstream({}) as (raw, url):
            with serve_proxy(settings_for(url)) as proxy:
                answer = await exchange(
                    proxy, b"POST /v1/customers HTTP/1.1\r\nHost: p\r\n" + head + b"\r\n\r\nname=x"
                )
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert raw.heads == []
