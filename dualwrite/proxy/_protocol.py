"""The proxy's HTTP protocol: uvicorn's httptools protocol with the limits ``[proxy]`` sets.

uvicorn bounds neither the size of a request's headers (httptools keeps an unfinished header in
memory however long it grows), nor their number, nor the time a caller takes to send them: a
caller sending a byte at a time (slowloris), or headers of megabytes, holds a connection and its
memory as long as it likes. ``LimitedHttpToolsProtocol`` answers as HTTP servers do and closes:

* 431 when the request line and headers pass ``max_header_bytes``, or the headers ``max_headers``;
* 408 when the headers are not all in ``header_timeout`` seconds after the request's first byte
  (a new connection that sends nothing is closed after that time, without a reply), or the body
  not in ``body_timeout`` seconds after the headers;
* past ``max_connections``, a new connection takes the place of the one that has waited longest
  for a request's headers (an idle keep-alive connection, or a caller sending its headers slowly),
  which gets 503 if it had sent anything; when every connection has a request in progress, the
  new one gets 503 (``Retry-After: 1``). A caller that sends its request at once is thus served
  while thousands of slow connections contend for the rest: a connection stays evictable only
  until its headers are in.

A response's status line and headers are held until its first body write (or the loop's next
turn, whichever comes first) and go out with it in one write (``HeadThenBody``): one segment and
one wake-up of the caller instead of two, for every reply that arrives whole, which is nearly
every Stripe reply.

A connection whose request was answered before its body was all in (413, 404) is not read to the
end: the proxy stops writing, discards what still arrives for ``LINGER_SECONDS`` (so that the
caller reads the reply rather than a reset) and closes it. The keep-alive timeout is uvicorn's own
(``timeout_keep_alive``). Replies are JSON in Stripe's error shape, so that SDKs show the message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from dualwrite.config import ProxySettings
from dualwrite.exceptions import DualwriteError
from dualwrite.models import stripe_error_body

__all__ = ["LINGER_SECONDS", "HeadThenBody", "LimitedHttpToolsProtocol", "limited_protocol"]

#: How long a connection answered before its body was in stays open, discarding, before closing.
LINGER_SECONDS = 2.0


_CONTINUE = b"HTTP/1.1 100 "


class HeadThenBody:
    """The connection's transport as one response cycle of uvicorn's sees it: the response's head
    is held, then written with the first body chunk in one ``write`` (one system call, one
    segment).

    A head that no body write follows in the same turn of the event loop (a HEAD request, a
    body that is not there yet) goes out on the loop's next turn, so nothing waits longer than
    that. ``close`` writes a held head first. A ``100 Continue`` is never held.
    """

    __slots__ = ("_expect_head", "_held", "_loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._expect_head = True  # the first write but a ``100 Continue`` is the head

    def write(self, data: bytes) -> None:
        """Write ``data``, holding a response's head until its body (module docstring)."""
        held = self._held
        if held is not None:
            self._held = None
            self.transport.write(held + data)
        elif self._expect_head and not data.startswith(_CONTINUE):
            self._expect_head = False
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        """Write a held head now."""
        held = self._held
        if held is not None:
            self._held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def is_closing(self) -> bool:
        """Whether the connection is closing (or closed)."""
        return self.transport.is_closing()

    def close(self) -> None:
        """Write a held head, then close the connection."""
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _RefusedError(DualwriteError):
    """Raised inside a parser callback to stop parsing a request over a limit (a private signal:
    the parser turns it into ``send_400_response``, where the refusal is answered)."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header, time and connection limits (module docstring)."""

    limits: ClassVar[ProxySettings] = ProxySettings()
    waiting: ClassVar[dict[LimitedHttpToolsProtocol, None]] = {}
    """The server's connections waiting for a request's headers, in the order they began to (an
    ordered set; each class from ``limited_protocol`` has its own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -- connections --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._make_room():
            self.transport = transport
            self._reply(503, "Too many connections to the proxy; retry shortly.", retry=True)
            return
        super().connection_made(transport)
        self._arm_head()
        self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self.waiting.pop(self, None)
        if self.flow is None:  # refused at connection_made: nothing was set up
            return
        super().connection_lost(exc)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request's headers, if any."""
        other = next(iter(self.waiting), None)
        if other is None:
            return False
        del self.waiting[other]
        self.connections.discard(other)  # counted out now: its close completes later
        if other._head_bytes:
            other._reply(503, "The proxy is busy and your request was too slow; retry.", retry=True)
        else:
            other._cancel_timers()
            other.transport.close()
        return True

    def _wait(self) -> None:
        """Mark this connection as waiting for a request's headers (from now)."""
        self.waiting.pop(self, None)
        self.waiting[self] = None

    # -- bytes in ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        self._arm_head()
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed what fits: if the head ends within it, the rest is body (or the next request).
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self._in_head:
            self._reply(431, "The request's headers are larger than the proxy accepts.")
            return
        super().data_received(data[room:])

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, "The request has more header fields than the proxy accepts.")
            raise _RefusedError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.waiting.pop(self, None)
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.start_request()
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_too_slow)

    def start_request(self) -> None:
        """Start the request whose headers are in: an ASGI cycle of uvicorn's (a subclass may
        take the request another way, ``dualwrite.proxy._fast``)."""
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not None and self.cycle is not before:
            # Before its task first runs (now, or after the pipelined requests ahead of it).
            self.cycle.transport = cast(asyncio.Transport, HeadThenBody(self.transport, self.loop))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.message_done()

    def message_done(self) -> None:
        """The request's body is all in: its time limit ends; the next request's head begins."""
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._in_head = True

    def on_response_complete(self) -> None:
        writer = None if self.cycle is None else self.cycle.transport
        if isinstance(writer, HeadThenBody):
            writer.flush()  # a HEAD reply's head: no body write carries it
        super().on_response_complete()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and cycle.more_body:
            # Answered before its body was all in (413, 404...): the rest is discarded as it
            # comes (the parser drops a finished request's body) until the connection closes.
            self._cancel_timers()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        elif self._in_head and not self.pipeline:
            self._wait()  # idle on keep-alive until the next request

    def send_400_response(self, msg: str) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is not None:  # a limit stopped the parser (``_RefusedError`` in a callback)
            self._reply(*refusal)
            return
        super().send_400_response(msg)

    # -- timers --------------------------------------------------------------------------------

    def _arm_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_too_slow)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A reply is under way: the next request's head waits behind it, and will be
            # timed once that reply is out.
            self.cycle.keep_alive = False
            return
        if self._head_bytes == 0:
            self.transport.close()  # connected and silent: no request to answer
            return
        self._reply(408, "The request's headers were not received in time.")

    def _body_too_slow(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        if cycle.response_started:
            self.transport.close()
            return
        # The app may still be reading: it sees a disconnect, and its reply goes nowhere.
        cycle.disconnected = True
        cycle.message_event.set()
        self._reply(408, "The request's body was not received in time.")

    # -- replies -------------------------------------------------------------------------------

    def _reply(self, status: int, message: str, *, retry: bool = False) -> None:
        """Answer ``status`` with Stripe's error shape, then close the connection."""
        self._cancel_timers()
        error_type = "api_error" if status >= 500 else "invalid_request_error"
        body = json.dumps(stripe_error_body(error_type, message)).encode()
        head = [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n",
        ]
        if retry:
            head.append(b"retry-after: 1\r\n")
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()


def limited_protocol(limits: ProxySettings) -> type[LimitedHttpToolsProtocol]:
    """The protocol class uvicorn builds per connection, with ``limits`` (and its own record of
    waiting connections)."""
    attributes = {"limits": limits, "waiting": {}}
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), attributes)
