"""How the proxy writes: a reply's head goes out with its body in one write (``HeadThenBody``, over
a real socket pair), pipelined and HEAD requests still get whole replies through the proxy, and
Stripe's clock is told each new ``Date`` once.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import stripe

from dualwrite.config import Settings
from dualwrite.proxy import serve_proxy
from dualwrite.proxy._protocol import HeadThenBody
from dualwrite.proxy._upstream import Upstream
from tests.conftest import STRIPE_KEY

pytestmark = pytest.mark.anyio

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
BODY = b"{}"


class _Pair:
    """A ``HeadThenBody`` over one end of a real socket pair; the other end is read directly."""

    def __init__(self, transport: asyncio.Transport, peer: socket.socket) -> None:
        self.writer = HeadThenBody(transport, asyncio.get_running_loop())
        self.transport = transport
        self.peer = peer

    def pending(self) -> bytes:
        """What the peer can read right now (b"" when nothing has arrived)."""
        try:
            return self.peer.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""

    async def received(self) -> bytes:
        """What the peer reads next (one ``recv``)."""
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.peer, 65536), 5)


@pytest.fixture
async def pair() -> AsyncIterator[_Pair]:
    """A real connected socket pair, one end under an asyncio transport."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    try:
        yield _Pair(transport, peer)
    finally:
        transport.close()
        peer.close()


async def test_a_head_and_body_written_in_the_same_turn_arrive_in_one_read(pair: _Pair) -> None:
    """Head then body with no turn of the loop between them: the peer reads them in one recv."""
    pair.writer.write(HEAD)
    assert pair.pending() == b""  # held
    pair.writer.write(BODY)
    assert await pair.received() == HEAD + BODY
    pair.writer.write(b"more")  # later chunks are written at once
    assert await pair.received() == b"more"


async def test_a_head_without_a_body_goes_out_on_the_next_turn(pair: _Pair) -> None:
    """A HEAD reply's head (no body write follows) is not held past one turn of the loop."""
    pair.writer.write(HEAD)
    assert pair.pending() == b""
    await asyncio.sleep(0)
    assert await pair.received() == HEAD


async def test_100_continue_is_never_held(pair: _Pair) -> None:
    """``100 Continue`` goes out at once (the caller waits for it to send its body); the real
    head after it is still held until its body."""
    pair.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert await pair.received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    pair.writer.write(HEAD)
    assert pair.pending() == b""
    pair.writer.write(BODY)
    assert await pair.received() == HEAD + BODY


async def test_close_writes_a_held_head_first(pair: _Pair) -> None:
    """Closing (uvicorn does when the app fails mid-reply) sends the held head, then EOF."""
    pair.writer.write(HEAD)
    pair.writer.close()
    assert await pair.received() == HEAD
    assert await pair.received() == b""
    assert pair.writer.is_closing()


def _customer(standin_url: str) -> str:
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": standin_url})
    return str(client.v1.customers.create({"name": "Writes"}).id)


def _whole_replies(data: bytes) -> list[tuple[bytes, bytes]]:
    """The complete raw HTTP/1.1 replies (Content-Length bodies) at the start of ``data``."""
    replies = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            break
        replies.append((head, rest[:length]))
        data = rest[length:]
    return replies


def _read_replies(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    data = b""
    while len(replies := _whole_replies(data)) < count:
        chunk = sock.recv(65536)
        assert chunk, f"the proxy closed the connection after {data!r}"
        data += chunk
    return replies


def test_pipelined_and_head_requests_get_whole_replies(
    settings: Settings, standin_url: str
) -> None:
    """Two GETs sent at once come back whole and in order; a HEAD gets its head alone, and the
    connection stays in step."""
    customer = _customer(standin_url)
    auth = f"Authorization: Bearer {STRIPE_KEY}\r\nHost: proxy\r\n"
    get = f"GET /v1/customers/{customer} HTTP/1.1\r\n{auth}\r\n".encode()
    with (
        serve_proxy(settings) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as sock,
    ):
        sock.settimeout(10)
        sock.sendall(get + get)
        replies = _read_replies(sock, 2)
        assert [head[:12] for head, _ in replies] == [b"HTTP/1.1 200"] * 2
        for _, body in replies:
            assert customer.encode() in body and body.rstrip().endswith(b"}")
        sock.sendall(f"HEAD /v1/customers/{customer} HTTP/1.1\r\n{auth}\r\n".encode())
        head = sock.recv(65536)  # (the stand-in has no HEAD route: a 404's head, no body)
        assert head.startswith(b"HTTP/1.1 ") and head.endswith(b"\r\n\r\n")
        sock.sendall(get)  # the connection is still in step: the next reply is whole
        [(head, body)] = _read_replies(sock, 1)
        assert head.startswith(b"HTTP/1.1 200") and customer.encode() in body


async def test_the_clock_is_told_each_new_date_once(settings: Settings) -> None:
    """Replies carrying the same ``Date`` tell Stripe's clock once; a new one is told at once."""
    told: list[str | None] = []
    upstream = Upstream(settings.stripe, on_date=told.append)
    scope: dict[str, Any] = {
        "method": "GET",
        "path": "/v1/balance",
        "headers": [(b"authorization", f"Bearer {STRIPE_KEY}".encode())],
    }
    dates = []
    try:
        for _ in range(12):
            reply = await upstream.exchange(scope, raw_target=b"/v1/balance", body=b"")
            dates.append(dict(reply.headers)[b"date"].decode())
            await asyncio.sleep(0.1)
    finally:
        await upstream.aclose()
    distinct = [date for index, date in enumerate(dates) if index == 0 or date != dates[index - 1]]
    assert told == distinct
    assert len(distinct) >= 2  # 1.2 s of replies: the second changed at least once
    assert len(told) < len(dates)
