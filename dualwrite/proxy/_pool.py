"""Raw keep-alive connections to the one configured upstream, for the fast path (``_fast``).

``UpstreamPool`` keeps up to ``[stripe] max_connections`` connections to ``settings.stripe.api_base``
(TLS with certificate and host name verification for ``https://``, as aiohttp does by default;
plain TCP for a local ``http://`` upstream). Each ``UpstreamConnection`` parses the replies with
httptools and hands the parser's callbacks to the exchange it carries (``_fast.ForwardCycle``),
which relays them to the caller as they arrive. Nothing here reads a request's headers or decides
where it goes: the destination is fixed at construction, as ``_upstream.Upstream``'s.

A connection goes back to the pool only after a whole reply to a wholly sent request, and when
the upstream did not ask to close it; one idle longer than ``IDLE_SECONDS`` is closed rather than
reused (the upstream may have dropped it). Callers past the connection cap wait in order for the
next connection released.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import Protocol, cast

import httptools
from yarl import URL

from dualwrite.config import StripeSettings

__all__ = ["IDLE_SECONDS", "MAX_HEAD_BYTES", "Exchange", "UpstreamConnection", "UpstreamPool"]

#: An idle upstream connection older than this is closed instead of reused (aiohttp keeps 15 s).
IDLE_SECONDS = 15.0
#: The largest reply head (status line and headers) read from the upstream.
MAX_HEAD_BYTES = 256 * 1024


class Exchange(Protocol):
    """What a connection tells the request it carries (``_fast.ForwardCycle``)."""

    def start(self, connection: UpstreamConnection) -> None:
        """A connection is ready: send the request on it."""

    def failed(self, exc: BaseException) -> None:
        """No connection could be made (refused, timed out, TLS refused)."""

    def reply_head(self, status: int, fields: bytes, *, keep_alive: bool) -> None:
        """The reply's status and its header fields as received (each after a CRLF)."""

    def reply_body(self, chunk: bytes) -> None:
        """A piece of the reply's body (decoded from chunked framing if it was)."""

    def reply_done(self) -> None:
        """The reply is complete."""

    def upstream_lost(self, exc: BaseException | None) -> None:
        """The connection closed (or broke) before the reply was complete."""

    def upstream_paused(self, paused: bool) -> None:
        """The upstream's write buffer passed its high-water mark (or drained)."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream, carrying one exchange at a time."""

    __slots__ = (
        "exchange",
        "idle_since",
        "in_head",
        "interim",
        "offset",
        "parser",
        "pool",
        "received",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.in_head = True
        self.interim = False
        self.received = b""
        """The bytes of the reply whose head is being parsed (``offset``: where it begins)."""
        self.offset = 0
        self.parser = httptools.HttpResponseParser(self)

    # -- transport ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        if self.in_head:
            self.received = self.received + data if self.received else data
            if len(self.received) > MAX_HEAD_BYTES:
                exchange = self.exchange  # no more is parsed: a broken reply
                self.close()
                exchange.upstream_lost(None)
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            exchange, self.exchange = self.exchange, None
            self.close()
            if exchange is not None:
                exchange.upstream_lost(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(False)

    # -- the reply parser's callbacks ----------------------------------------------------------

    # No ``on_header``: a reply's head is taken whole from the bytes (``head``), not one Python
    # call per header field.

    def on_headers_complete(self) -> None:
        received, offset = self.received, self.offset
        end = received.find(b"\r\n\r\n", offset)
        # The status line's end: the fields follow, each after a CRLF, as the exchange reads them.
        head = received[received.find(b"\r\n", offset) : end + 2]
        self.offset = end + 4  # an interim reply's head may be followed by the final one
        if self.exchange is not None:
            parser = self.parser
            status = parser.get_status_code()
            self.interim = status < 200
            if not self.interim:
                self.in_head = False
                self.received = b""
            self.exchange.reply_head(status, head, keep_alive=parser.should_keep_alive())

    def on_message_complete(self) -> None:
        if self.interim:  # the final reply's head may be in the bytes already received
            self.interim = False
        else:
            self.in_head = True
            self.received = b""
            self.offset = 0
        if self.exchange is not None:
            self.exchange.reply_done()

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.reply_body(body)

    # -- use -----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` (a request's head or a piece of its body)."""
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading the reply: the caller is not reading fast enough."""
        if self.transport is None or self.transport.is_closing():
            return
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection (it is not reused)."""
        self.exchange = None
        if self.transport is not None:
            self.transport.close()

    def usable(self, now: float) -> bool:
        """Whether an idle connection may carry another request."""
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and now - self.idle_since < IDLE_SECONDS
        )


class UpstreamPool:
    """Keep-alive connections to ``settings.api_base`` (module docstring).

    Args:
        settings: ``api_base`` (the only destination), ``timeout`` (to connect) and
            ``max_connections``.
    """

    def __init__(self, settings: StripeSettings) -> None:
        base = URL(settings.api_base)
        self.tls = base.scheme == "https"
        host = base.raw_host or "localhost"
        port = base.port or (443 if self.tls else 80)
        self.host, self.port = host, port
        name = f"[{host}]" if ":" in host else host
        self.host_header = (name if base.is_default_port() else f"{name}:{port}").encode("ascii")
        #: Prepended to every request's path (the base's own path, if it has one).
        self.prefix = base.raw_path.rstrip("/").encode("ascii")
        self.timeout = settings.timeout
        self.limit = settings.max_connections
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.tls else None
        self._idle: list[UpstreamConnection] = []
        self._open = 0
        self._waiting: deque[Exchange] = deque()
        self._connecting: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open or being opened."""
        return self._open

    def acquire(self, exchange: Exchange) -> None:
        """Give ``exchange`` a connection: an idle one now, a new one once connected, or the next
        one released when the pool is full."""
        idle = self._idle
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                connection = idle.pop()
                if connection.usable(now):
                    exchange.start(connection)
                    return
                connection.close()
        if self._open < self.limit:
            self._connect(exchange)
        else:
            self._waiting.append(exchange)

    def forget(self, exchange: Exchange) -> None:
        """``exchange`` no longer wants a connection (its caller left while it waited)."""
        with contextlib.suppress(ValueError):
            self._waiting.remove(exchange)

    def release(self, connection: UpstreamConnection) -> None:
        """A connection whose exchange finished cleanly: to the next waiting exchange, or idle."""
        connection.exchange = None
        if self._closed:
            connection.close()
            return
        if self._waiting:
            self._waiting.popleft().start(connection)
            return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)

    def lost(self, connection: UpstreamConnection) -> None:
        """A connection closed: one fewer open, and room for a waiting exchange."""
        self._open -= 1
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)
        if self._waiting and self._open < self.limit and not self._closed:
            self._connect(self._waiting.popleft())

    def _connect(self, exchange: Exchange) -> None:
        self._open += 1
        task = asyncio.get_running_loop().create_task(self._open_one(exchange))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _open_one(self, exchange: Exchange) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self.tls else None,
                )
        except (OSError, TimeoutError, ValueError) as exc:  # ssl errors are OSError/ValueError
            self._open -= 1
            if self._waiting and self._open < self.limit and not self._closed:
                self._connect(self._waiting.popleft())
            exchange.failed(exc)
            return
        except asyncio.CancelledError:
            self._open -= 1
            raise
        exchange.start(connection)

    async def aclose(self) -> None:
        """Close every connection; nothing is handed out afterwards."""
        self._closed = True
        for task in list(self._connecting):
            task.cancel()
        for connection in self._idle:
            connection.close()
        self._idle.clear()
