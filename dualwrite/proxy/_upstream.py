"""Forwarding to the one configured upstream: a pooled aiohttp client, bodies streamed both ways.

Where a request goes is fixed at construction (``settings.stripe.api_base``). A request's Host
header, an absolute-form target (``GET http://elsewhere/v1/… HTTP/1.1``) and ``X-Forwarded-*``
headers never choose the destination: only the path and query travel, so the proxy cannot be used
as an open proxy. Which headers cross is ``_headers``'s business; none the caller did not send is
added (aiohttp's own Accept, Accept-Encoding, User-Agent and Content-Type are skipped), and a
header value HTTP cannot carry gets a 400. Replies come back as received: no decompression, no
cookie jar. Bodies are streamed in both directions, except a request body with a Content-Length of
at most ``SMALL_BODY_BYTES`` (read, then sent in one write) and ``exchange``'s, which the
usage-record interception uses for its small, bounded bodies.

Network failures on the way to Stripe come back to the caller in Stripe's error shape (502 when the
upstream could not be reached, 504 when it did not answer in time), without the upstream address
or a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from dualwrite._http import read_body, stripe_error
from dualwrite.config import StripeSettings
from dualwrite.exceptions import ClientDisconnectedError, DualwriteError
from dualwrite.models import StripeFailure
from dualwrite.proxy._headers import (
    Headers,
    UnsendableHeaderError,
    content_length,
    is_chunked,
    reply_headers,
    request_headers,
)

__all__ = [
    "SMALL_BODY_BYTES",
    "Upstream",
    "UpstreamReply",
    "request_target",
    "send_reply",
    "too_large",
]

log = logging.getLogger("dualwrite.proxy")

#: Request bodies with a Content-Length up to this size are read whole, then sent in one write.
SMALL_BODY_BYTES = 64 * 1024

#: Headers aiohttp adds on its own unless told not to (Host, framing and Connection it must add).
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")


class _BodyStoppedError(DualwriteError):
    """The caller's streamed body ended early: too large, or the caller left."""


class _Body:
    """Why the caller's streamed body stopped early (aiohttp wraps what its iterator raises)."""

    __slots__ = ("caller_gone", "too_large")

    def __init__(self) -> None:
        self.too_large = False
        self.caller_gone = False


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A whole reply: Stripe's, or one the proxy made up for a network failure on the way."""

    status: int
    headers: Headers
    body: bytes
    failure: StripeFailure | None = None
    """Set when the upstream could not be reached or did not answer in time (no Stripe reply)."""

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower-case), if any."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None


def request_target(scope: Scope) -> tuple[str, bytes]:
    """The request's path (decoded, for routing) and raw path with query (for forwarding).

    An absolute-form target keeps only its path: the host it names is ignored.

    Raises:
        ValueError: the target is neither origin-form nor absolute-form, or is not ASCII.
    """
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    if not raw.startswith(b"/"):
        scheme, sep, rest = raw.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            msg = "the request target is not a path"
            raise ValueError(msg)
        slash = rest.find(b"/")
        raw = rest[slash:] if slash >= 0 else b"/"
        raw = raw.partition(b"?")[0]
    path = unquote(raw.decode("ascii"))
    query: bytes = scope.get("query_string", b"")
    return path, (raw + b"?" + query) if query else raw


def too_large(limit: int) -> JSONResponse:
    """Stripe's error shape for a body over the limit (413)."""
    return stripe_error(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )


def _unsendable_header() -> UpstreamReply:
    """A 400 for a header value with control characters: the caller's fault, nothing sent."""
    response = stripe_error(400, "A request header holds characters HTTP does not allow.")
    failure = StripeFailure(
        http_status=400,
        type="invalid_request_error",
        message="a request header holds characters HTTP does not allow",
        retryable=False,
    )
    return UpstreamReply(400, list(response.raw_headers), bytes(response.body), failure)


def _gateway_error(exc: BaseException, method: str, path: str) -> UpstreamReply:
    """A Stripe-shaped 502/504 for a request that got no reply from the upstream."""
    timed_out = isinstance(exc, TimeoutError)
    reason = "timed out" if timed_out else "connection failed"
    log.warning("upstream %s %s: %s (%s)", method, path, reason, type(exc).__name__)
    status = 504 if timed_out else 502
    message = (
        "The request to Stripe timed out; it may or may not have been processed. Retry with the "
        "same Idempotency-Key."
        if timed_out
        else "The proxy could not reach Stripe. Retry with the same Idempotency-Key."
    )
    response = stripe_error(status, message, error_type="api_error")
    failure = StripeFailure(
        http_status=None,
        type="api_connection_error",
        message=f"network error talking to Stripe: {reason}",
        retryable=True,
    )
    return UpstreamReply(status, list(response.raw_headers), bytes(response.body), failure)


async def send_reply(reply: UpstreamReply, send: Send) -> None:
    """Send a whole reply to the caller."""
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


class Upstream:
    """The configured Stripe (or stand-in), reached through one ``aiohttp.ClientSession`` whose
    connector keeps up to ``max_connections`` keep-alive connections.

    The session is made at the first request, inside the event loop that serves the app.

    Args:
        settings: ``api_base`` (the only destination), ``timeout`` and ``max_connections``.
        on_date: told every reply's ``Date`` header (the engine follows Stripe's clock with it).
    """

    def __init__(
        self, settings: StripeSettings, *, on_date: Callable[[str | None], None] | None = None
    ):
        self._on_date = on_date
        self._last_date: str | None = None
        base = URL(settings.api_base)
        # Only the path and query of a request are appended; the origin never comes from it.
        self._prefix = str(base.origin()) + base.raw_path.rstrip("/")
        self._max_connections = settings.max_connections
        # Per phase, like httpx's Timeout(t): getting a connection, and each read of the reply.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.timeout,
            sock_connect=settings.timeout,
            sock_read=settings.timeout,
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                timeout=self._timeout,
                # One session serves every caller: a Set-Cookie in one caller's reply must never
                # ride along on another caller's request.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Bodies go back as Stripe encoded them, with its Content-Encoding.
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                # The destination is the configured base only, never an environment proxy.
                trust_env=False,
                requote_redirect_url=False,
            )
        return session

    @property
    def connector(self) -> aiohttp.BaseConnector | None:
        """The connection pool, once the first request has made it."""
        return None if self._session is None else self._session.connector

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()

    def url(self, raw_target: bytes) -> URL:
        """The upstream URL for a raw path and query: the configured base, never another host."""
        return URL(self._prefix + raw_target.decode("ascii"), encoded=True)

    async def forward(
        self, scope: Scope, receive: Receive, send: Send, *, raw_target: bytes, max_body: int
    ) -> None:
        """Stream the caller's request to the upstream and the upstream's reply to the caller."""
        method: str = scope["method"]
        try:
            headers = request_headers(scope)
        except UnsendableHeaderError:
            await send_reply(_unsendable_header(), send)
            return
        length = content_length(headers)
        if length == -1:
            await stripe_error(400, "The Content-Length header is invalid.")(scope, receive, send)
            return
        if length is not None and length > max_body:
            await too_large(max_body)(scope, receive, send)
            return
        state = _Body()
        data: bytes | AsyncIterator[bytes] | None = None
        if length is not None and length <= SMALL_BODY_BYTES:
            if length > 0:
                try:
                    data = await read_body(receive, max_body)
                except ClientDisconnectedError:
                    return  # the caller left
                if data is None:  # more than its Content-Length said
                    await too_large(max_body)(scope, receive, send)
                    return
        elif length is not None or is_chunked(scope):
            data = _stream_body(receive, max_body, state)
        try:
            response = await self._client().request(
                method, self.url(raw_target), headers=headers, data=data, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if state.too_large:
                await too_large(max_body)(scope, receive, send)
            elif not state.caller_gone:
                await send_reply(_gateway_error(exc, method, scope["path"]), send)
            return
        self._saw_reply(response)
        try:
            if state.too_large or state.caller_gone:
                response.close()
                if state.too_large:
                    await too_large(max_body)(scope, receive, send)
                return
            await _relay(response, send)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status line is out: leaving the response incomplete makes the server close the
            # connection, which is how a client learns that the body was cut short.
            response.close()
            log.warning(
                "upstream %s %s: reply cut short (%s)", method, scope["path"], type(exc).__name__
            )
        except BaseException:
            response.close()  # the caller left mid-reply: this connection is not reusable
            raise
        finally:
            response.release()

    async def exchange(self, scope: Scope, *, raw_target: bytes, body: bytes) -> UpstreamReply:
        """Send the caller's request with an already read ``body``; return the whole reply."""
        method: str = scope["method"]
        try:
            headers = request_headers(scope, identity=True)
        except UnsendableHeaderError:
            return _unsendable_header()
        try:
            async with self._client().request(
                method, self.url(raw_target), headers=headers, data=body, allow_redirects=False
            ) as response:
                self._saw_reply(response)
                content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _gateway_error(exc, method, scope["path"])
        return UpstreamReply(response.status, reply_headers(response.raw_headers), content)

    def _saw_reply(self, response: aiohttp.ClientResponse) -> None:
        self.saw_date(response.headers.get("Date"))

    def saw_date(self, date: str | None) -> None:
        """Tell ``on_date`` a reply's ``Date`` header (the fast path's replies too)."""
        # Date has whole seconds: the first reply with a given one bounds Stripe's clock most
        # tightly, and later ones with the same text add nothing (parsing it was 2 % of a
        # forwarded call's CPU).
        if self._on_date is not None and date != self._last_date:
            self._last_date = date
            self._on_date(date)


async def _relay(response: aiohttp.ClientResponse, send: Send) -> None:
    """The upstream's status, headers and body to the caller, each chunk as it arrives (a reply
    that arrived whole goes in one body message)."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": reply_headers(response.raw_headers),
        }
    )
    content = response.content
    while True:
        chunk = await content.readany()
        if not chunk:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        last = content.at_eof()
        await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        if last:
            return


async def _stream_body(receive: Receive, limit: int, state: _Body) -> AsyncIterator[bytes]:
    """The caller's body, chunk by chunk as it arrives, refused once it passes ``limit`` bytes
    (``state`` says why it stopped: aiohttp reports only a failed upload)."""
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            state.caller_gone = True
            raise _BodyStoppedError("the caller disconnected")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            state.too_large = True
            raise _BodyStoppedError("the body is over the limit")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
