"""The fast path: a forwarded request relayed as bytes, without ASGI, aiohttp or a task.

``FastHttpToolsProtocol`` is the proxy's HTTP protocol (``_protocol.LimitedHttpToolsProtocol``,
with every ``[proxy]`` limit) that, once a request's headers are in, decides from its method and
path alone whether the proxy forwards it untouched (``ProxyApp.forwards``). Those requests become a
``ForwardCycle``: the request's head is rewritten for the upstream (only the headers Stripe reads,
as ``_headers`` says; Host the upstream's), written on a keep-alive connection of the
``_pool.UpstreamPool``, the body streamed after it as the parser yields it, and the reply relayed
as the upstream's parser yields it, with its framing: a Content-Length reply as is, a chunked or
close-delimited one re-chunked, hop-by-hop headers dropped. Both directions have backpressure: the
caller's reading pauses while the upstream's write buffer is full, and the upstream's while the
caller's is.

Everything else goes to the ASGI app, as before, through uvicorn's cycle on the same connection:
usage records, the proxy's own endpoints (``/_dualwrite/…``, ``/metrics``, the webhook path), and
any request the fast path does not speak: HTTP/1.0, ``HEAD``, a chunked request body
(``Transfer-Encoding``), ``Expect: 100-continue``, an upgrade, a percent-encoded or
absolute-form target, a body over ``max_body_bytes`` (the ASGI app answers 413). Requests on one
connection are answered in order, whichever path each takes (uvicorn's pipeline).

Kept from the ASGI path: the 502 / 504 in Stripe's shape when the upstream cannot be reached, does
not answer in ``[stripe] timeout`` or breaks before its reply's head (a reply cut after its head
closes the caller's connection), a 400 for a header value HTTP cannot carry, the request metrics
and access line (route ``stripe``), and each reply's ``Date`` to the engine's clock. Framing
attacks never reach it: httptools refuses a request with both Content-Length and
Transfer-Encoding, or an invalid or repeated Content-Length (400, connection closed).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from dualwrite.config import ProxySettings
from dualwrite.exceptions import DualwriteError, UnsendableHeaderError
from dualwrite.instruments import count_request
from dualwrite.metrics import path_template
from dualwrite.proxy._headers import HOP_BY_HOP_HEADERS, forwarded_value, reply_headers
from dualwrite.proxy._pool import UpstreamConnection
from dualwrite.proxy._protocol import LimitedHttpToolsProtocol
from dualwrite.proxy._upstream import UpstreamReply, _gateway_error, _unsendable_header

if TYPE_CHECKING:
    from dualwrite.proxy._app import ProxyApp


class RunningApp(Protocol):
    """Where the app is, once uvicorn has built it (``_server.RunningProxy``)."""

    app: ProxyApp | None


__all__ = ["FastHttpToolsProtocol", "ForwardCycle", "RunningApp", "fast_protocol"]

log = logging.getLogger("dualwrite.proxy")
access_log = logging.getLogger("dualwrite.access")

_BODY_METHODS = (b"POST", b"PUT", b"PATCH")
_NOT_FAST = (b"HEAD", b"CONNECT")
_NO_BODY_STATUS = (204, 304)
_LAST_CHUNK = b"0\r\n\r\n"


#: A header field that describes the connection (its name after a CRLF: a whole field name).
_HOP_BY_HOP = re.compile(
    rb"\r\n(?:" + b"|".join(sorted(HOP_BY_HOP_HEADERS)) + rb")[ \t]*:", re.IGNORECASE
)
#: Connection tokens that name no end-to-end field.
_NOT_HEADERS = HOP_BY_HOP_HEADERS | {b"close", b""}
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:", re.IGNORECASE)
_TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding[ \t]*:", re.IGNORECASE)
_DATE = re.compile(rb"\r\ndate[ \t]*:[ \t]*([^\r]*?)[ \t]*\r", re.IGNORECASE)


def _without_hop_by_hop(fields: bytes) -> bytes:
    """``fields`` (each after a CRLF) without the hop-by-hop ones (``_headers.reply_headers``)."""
    kept = []
    start = 0
    for match in _HOP_BY_HOP.finditer(fields):
        end = fields.index(b"\r\n", match.end())
        if match[0][2:].lower().startswith(b"connection"):
            named = fields[match.end() : end].lower().split(b",")
            if not all(token.strip() in _NOT_HEADERS for token in named):
                return _filtered(fields)  # it names other fields: those go too
        kept.append(fields[start : match.start()])
        start = end
    kept.append(fields[start:])
    return b"".join(kept)


def _filtered(fields: bytes) -> bytes:
    """``_without_hop_by_hop`` field by field, for a Connection header that names fields."""
    pairs = []
    for line in fields.split(b"\r\n")[1:-1]:
        name, _, value = line.partition(b":")
        pairs.append((name.rstrip(b" \t"), value.strip(b" \t")))
    return b"".join(b"\r\n%b: %b" % pair for pair in reply_headers(pairs)) + b"\r\n"


class _ClosedByPeerError(DualwriteError, ConnectionError):
    """The upstream closed the connection before its reply's head."""


class ForwardCycle:
    """One forwarded request, standing where uvicorn's ``RequestResponseCycle`` stands (the
    attributes uvicorn's protocol and ``LimitedHttpToolsProtocol`` read), and the exchange an
    upstream connection reports to (``_pool.Exchange``)."""

    __slots__ = (
        "_chunked",
        "_close_delimited",
        "_connection",
        "_done",
        "_head",
        "_interim",
        "_last_read",
        "_pending",
        "_pending_bytes",
        "_reply_head",
        "_started",
        "_status",
        "_timer",
        "_upstream_keep_alive",
        "app",
        "disconnected",
        "flow",
        "keep_alive",
        "message_event",
        "method",
        "more_body",
        "path",
        "protocol",
        "response_complete",
        "response_started",
        "transport",
    )

    def __init__(
        self,
        protocol: FastHttpToolsProtocol,
        app: ProxyApp,
        head: bytes | None,
        *,
        method: str,
        path: str,
        keep_alive: bool,
    ) -> None:
        self.protocol = protocol
        self.app = app
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.message_event = self  # uvicorn "sets" it on a disconnect: ``set`` below
        self.method = method
        self.path = path
        self.keep_alive = keep_alive
        self.disconnected = False
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self._head = head
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._connection: UpstreamConnection | None = None
        self._started = time.perf_counter()
        self._status = 500
        self._reply_head: bytes | None = None
        self._chunked = False
        self._close_delimited = False
        self._upstream_keep_alive = False
        self._interim = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._done = False

    # -- the caller's side ---------------------------------------------------------------------

    def run(self) -> None:
        """Start: its turn on the connection has come."""
        self.protocol.active = self
        if self._head is None:
            self._respond(_unsendable_header())
            return
        self.app.pool.acquire(self)

    def body(self, chunk: bytes) -> None:
        """A piece of the caller's body: to the upstream, or held until a connection is ready."""
        if self._done:
            return
        connection = self._connection
        if connection is not None:
            connection.write(chunk)
            return
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes > HIGH_WATER_LIMIT:
            self.flow.pause_reading()

    def set(self) -> None:
        """uvicorn's disconnect signal (``connection_lost``, the body timeout): stop."""
        if self.disconnected:
            self.abort()

    def abort(self) -> None:
        """The caller left (or was cut off): drop the upstream side, which is not reusable."""
        if self._done:
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        else:
            self.app.pool.forget(self)
        self._finish()

    def client_paused(self, paused: bool) -> None:
        """The caller's write buffer passed its high-water mark (or drained)."""
        if self._connection is not None:
            self._connection.pause_reading(paused)

    # -- the upstream's side (``_pool.Exchange``) -----------------------------------------------

    def start(self, connection: UpstreamConnection) -> None:
        """Send the request's head, and what body is in, on ``connection``."""
        if self._done:  # the caller left while it waited: the connection is clean
            self.app.pool.release(connection)
            return
        connection.exchange = self
        self._connection = connection
        head = cast(bytes, self._head)
        if self._pending:
            head += b"".join(self._pending)
            self._pending.clear()
            if self._pending_bytes > HIGH_WATER_LIMIT:
                self.flow.resume_reading()
        connection.write(head)
        loop = self.protocol.loop
        self._last_read = loop.time()
        self._timer = loop.call_later(self.app.pool.timeout, self._check_timeout)

    def failed(self, exc: BaseException) -> None:
        """No connection: 502, or 504 when connecting timed out."""
        if not self._done:
            self._respond(_gateway_error(exc, self.method, self.path))

    def upstream_paused(self, paused: bool) -> None:
        """Stop (or resume) reading the caller's body while the upstream's buffer is full."""
        if self._done:
            return
        if paused:
            self.flow.pause_reading()
        else:
            self.flow.resume_reading()

    def reply_head(self, status: int, fields: bytes, *, keep_alive: bool) -> None:
        """Build the reply's head for the caller (written with the first body bytes): the
        upstream's header fields as received, but the hop-by-hop ones."""
        if status < 200:  # an interim reply (100 Continue): not the caller's business
            self._interim = True
            return
        self._last_read = self.protocol.loop.time()
        self._status = status
        self._upstream_keep_alive = keep_alive
        has_length = _CONTENT_LENGTH.search(fields) is not None
        has_encoding = False
        if _HOP_BY_HOP.search(fields) is not None:
            has_encoding = _TRANSFER_ENCODING.search(fields) is not None
            fields = _without_hop_by_hop(fields)
        parts = [STATUS_LINE[status], fields[2:]]
        if status not in _NO_BODY_STATUS and not has_length:
            self._chunked = True
            self._close_delimited = not has_encoding
            parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self._reply_head = b"".join(parts)
        self.response_started = True
        date = _DATE.search(fields)
        if date is not None:
            self.app.upstream.saw_date(date[1].decode("latin-1"))

    def reply_body(self, chunk: bytes) -> None:
        """Relay a piece of the reply's body (with the held head, the first time)."""
        if self._done or not chunk:
            return
        self._last_read = self.protocol.loop.time()
        if self._chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        head = self._reply_head
        if head is not None:
            self._reply_head = None
            chunk = head + chunk
        self.transport.write(chunk)

    def reply_done(self) -> None:
        """The reply is complete: the connection back to the pool, the caller's turn over."""
        if self._interim:
            self._interim = False
            return
        if self._done:
            return
        connection, self._connection = self._connection, None
        self._end_reply()
        if connection is not None:
            if self._upstream_keep_alive and not self.more_body and not self._close_delimited:
                self.app.pool.release(connection)
            else:
                connection.close()
        self._finish()

    def upstream_lost(self, exc: BaseException | None) -> None:
        """The upstream closed before the reply was complete."""
        self._connection = None
        if self._done:
            return
        if self._reply_head is None and not self.response_started:
            self._respond(_gateway_error(exc or _ClosedByPeerError(), self.method, self.path))
            return
        if self._close_delimited and exc is None:  # its end was the connection's
            self._end_reply()
            self._finish()
            return
        log.warning(
            "upstream %s %s: reply cut short (%s)",
            self.method,
            self.path,
            type(exc).__name__ if exc is not None else "connection closed",
        )
        self._reply_head = None
        self.transport.close()  # how the caller learns that the body was cut short
        self._finish()

    # -- ends ----------------------------------------------------------------------------------

    def _end_reply(self) -> None:
        head, self._reply_head = self._reply_head, None
        tail = _LAST_CHUNK if self._chunked else b""
        if head is not None:
            self.transport.write(head + tail)
        elif tail:
            self.transport.write(tail)
        self.response_complete = True

    def _respond(self, reply: UpstreamReply) -> None:
        """Answer with a reply the proxy made (a 502, 504 or 400), if nothing was sent yet."""
        self._status = reply.status
        parts = [STATUS_LINE[reply.status]]
        for key, value in reply.headers:
            parts += (key, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", reply.body)
        self.transport.write(b"".join(parts))
        self.response_started = self.response_complete = True
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        protocol = self.protocol
        if protocol.active is self:
            protocol.active = None
        seconds = time.perf_counter() - self._started
        count_request("stripe", self._status, seconds)
        if self.app.access_log:
            template = path_template(self.path)
            access_log.info(
                "%s %s %d %.1f ms",
                self.method,
                template,
                self._status,
                seconds * 1000,
                extra={
                    "method": self.method,
                    "path": template,
                    "route": "stripe",
                    "status": self._status,
                    "duration_ms": round(seconds * 1000, 3),
                },
            )
        if self.disconnected:
            return
        if not self.response_complete:
            self.response_complete = True
            self.keep_alive = False
        if not self.keep_alive:
            self.transport.close()
        protocol.on_response_complete()

    def _check_timeout(self) -> None:
        self._timer = None
        if self._done:
            return
        loop = self.protocol.loop
        left = self._last_read + self.app.pool.timeout - loop.time()
        if left > 0:
            self._timer = loop.call_later(left, self._check_timeout)
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        if not self.response_started:
            self._respond(_gateway_error(TimeoutError(), self.method, self.path))
            return
        log.warning("upstream %s %s: reply cut short (TimeoutError)", self.method, self.path)
        self.transport.close()
        self._finish()


class FastHttpToolsProtocol(LimitedHttpToolsProtocol):
    """``LimitedHttpToolsProtocol`` that relays forwarded requests itself (module docstring)."""

    running: ClassVar[RunningApp | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active: ForwardCycle | None = None
        """The forwarded request under way on this connection, if any."""

    def start_request(self) -> None:
        running = self.running
        app = None if running is None else running.app
        cycle = None if app is None else self._forward_cycle(app)
        if cycle is None:
            super().start_request()
            return
        existing = self.cycle
        self.cycle = cast(Any, cycle)
        if existing is None or existing.response_complete:
            cycle.run()
        else:  # pipelined behind a request still being answered
            self.flow.pause_reading()
            self.pipeline.appendleft((cast(Any, cycle), cast(Any, app)))

    def _forward_cycle(self, app: ProxyApp) -> ForwardCycle | None:
        """A cycle for this request if the proxy forwards it untouched and the fast path speaks
        it; None sends it to the ASGI app."""
        parser = self.parser
        if parser.should_upgrade() or parser.get_http_version() != "1.1":
            return None
        method = parser.get_method()
        url: bytes = self.url
        if method in _NOT_FAST or not url.startswith(b"/") or b"#" in url:
            return None
        raw = url.partition(b"?")[0]
        if b"%" in raw or not raw.isascii():
            return None
        path = raw.decode("ascii")
        method_text = method.decode("ascii")
        if not app.forwards(method_text, path):
            return None
        pool = app.pool
        parts = [method, b" ", pool.prefix, url, b" HTTP/1.1\r\nHost: ", pool.host_header, b"\r\n"]
        length: bytes | None = None
        unsendable = False
        for name, value in self.headers:
            if name == b"transfer-encoding" or name == b"expect":
                return None
            if name == b"content-length":
                length = value
            try:
                sent = forwarded_value(name, value)
            except UnsendableHeaderError:
                unsendable = True
                continue
            if sent is not None:
                parts += (name, b": ", sent, b"\r\n")
        if length is not None and (not length.isdigit() or int(length) > app.max_body_bytes):
            return None  # the ASGI app answers (400, or 413 without reading the body)
        if length is None and method in _BODY_METHODS:
            parts.append(b"content-length: 0\r\n")
        parts.append(b"\r\n")
        return ForwardCycle(
            self,
            app,
            None if unsendable else b"".join(parts),
            method=method_text,
            path=path,
            keep_alive=parser.should_keep_alive(),
        )

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if isinstance(cycle, ForwardCycle):
            cycle.run()
            return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if isinstance(cycle, ForwardCycle):
            cycle.body(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if isinstance(cycle, ForwardCycle):
            cycle.more_body = False
            self.message_done()
            return
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        active = self.active
        if active is not None:
            active.disconnected = True
            active.abort()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.active is not None:
            self.active.client_paused(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.active is not None:
            self.active.client_paused(False)


def fast_protocol(limits: ProxySettings, running: RunningApp) -> type[FastHttpToolsProtocol]:
    """The protocol class uvicorn builds per connection: ``limits``, and the app ``running``
    holds once uvicorn has built it."""
    attributes = {"limits": limits, "waiting": {}, "running": running}
    return type("FastHttpToolsProtocol", (FastHttpToolsProtocol,), attributes)
