"""Forwarding to the one configured upstream: a pooled httpx client, bodies streamed both ways.

Where a request goes is fixed at construction (``settings.stripe.api_base``). A request's Host
header, an absolute-form target (``GET http://elsewhere/v1/… HTTP/1.1``) and ``X-Forwarded-*``
headers never choose the destination: only the path and query travel, so the proxy cannot be used
as an open proxy. Up go the headers Stripe reads; down come every response header but the
hop-by-hop ones. Bodies are streamed in both directions, never held whole, except by ``exchange``,
which the usage-record interception uses for its small, already bounded bodies.

Network failures on the way to Stripe come back to the caller in Stripe's error shape (502 when the
upstream could not be reached, 504 when it did not answer in time), without the upstream address
or a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import unquote

import httpx
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from dualwrite.config import StripeSettings
from dualwrite.exceptions import DualwriteError
from dualwrite.middleware import stripe_error
from dualwrite.models import StripeFailure
from dualwrite.proxy._pool import ShardedTransport

__all__ = [
    "FORWARDED_REQUEST_HEADERS",
    "HOP_BY_HOP_HEADERS",
    "Upstream",
    "UpstreamReply",
    "request_target",
    "send_reply",
    "too_large",
]

log = logging.getLogger("dualwrite.proxy")

#: Request headers that travel to Stripe, besides any ``Stripe-*`` and ``X-Stripe-*`` header.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"authorization",
        b"content-encoding",
        b"content-length",
        b"content-type",
        b"idempotency-key",
        b"stripe-account",
        b"stripe-context",
        b"stripe-version",
        b"user-agent",
        b"x-stripe-client-user-agent",
    }
)
_STRIPE_PREFIXES = (b"stripe-", b"x-stripe-")

#: Headers that describe one connection, never the message (RFC 9110 §7.6.1): not passed on.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

Headers = list[tuple[bytes, bytes]]


class _BodyTooLargeError(DualwriteError):
    """The caller's body grew past the limit while it was being streamed up."""


class _CallerGoneError(DualwriteError):
    """The caller disconnected before its body was complete."""


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


def _gateway_error(exc: httpx.HTTPError, method: str, path: str) -> UpstreamReply:
    """A Stripe-shaped 502/504 for a request that got no reply from the upstream (400 when the
    caller's own request could not be written as HTTP/1.1: a header value with control bytes)."""
    if isinstance(exc, httpx.LocalProtocolError):
        response = stripe_error(400, "A request header holds characters HTTP does not allow.")
        failure = StripeFailure(
            http_status=400,
            type="invalid_request_error",
            message="a request header holds characters HTTP does not allow",
            retryable=False,
        )
        return UpstreamReply(400, list(response.raw_headers), bytes(response.body), failure)
    timed_out = isinstance(exc, httpx.TimeoutException)
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


def _reply_headers(raw: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Every response header but the hop-by-hop ones (and those the Connection header names)."""
    named: set[bytes] = set()
    for key, value in raw:
        if key.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return [
        (key, value)
        for key, value in raw
        if (lower := key.lower()) not in HOP_BY_HOP_HEADERS and lower not in named
    ]


class Upstream:
    """The configured Stripe (or stand-in), reached through one ``httpx.AsyncClient`` whose pool
    (``ShardedTransport``) holds ``max_connections`` keep-alive connections.

    Args:
        settings: ``api_base`` (the only destination), ``timeout`` and ``max_connections``.
        transport: an httpx transport to use instead of the network (tests).
    """

    def __init__(
        self, settings: StripeSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ):
        self._base = httpx.URL(settings.api_base)
        self._base_path = self._base.raw_path.partition(b"?")[0].rstrip(b"/")
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout),
            follow_redirects=False,
            transport=transport
            or ShardedTransport(
                max_connections=settings.max_connections,
                verify_tls=settings.api_base.startswith("https://"),
            ),
            # One client serves every caller: a Set-Cookie in one caller's reply must never ride
            # along on another caller's request.
            cookies=httpx.Cookies(CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))),
            # The destination is the configured base only, never an environment proxy; and httpx
            # re-reads the environment on every request when this is on (~0.4 ms each, measured).
            trust_env=False,
        )
        # httpx adds Accept, Accept-Encoding, Connection and User-Agent of its own to every
        # request; a proxy sends the caller's, or none.
        for name in list(self._client.headers):
            del self._client.headers[name]

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def url(self, raw_target: bytes) -> httpx.URL:
        """The upstream URL for a raw path and query: the configured base, never another host."""
        return self._base.copy_with(raw_path=self._base_path + raw_target)

    @staticmethod
    def request_headers(scope: Scope, *, identity: bool = False) -> Headers:
        """The caller's headers that Stripe reads (``identity``: ask for an uncompressed reply)."""
        headers: Headers = []
        for key, value in scope["headers"]:
            name = key.lower()
            if identity and name in (b"accept-encoding", b"content-length"):
                continue
            if name in FORWARDED_REQUEST_HEADERS or name.startswith(_STRIPE_PREFIXES):
                # Surrounding whitespace is not part of a field value (RFC 9110 5.5), and h11
                # refuses to send it.
                headers.append((key, value.strip(b" \t")))
        if identity:
            headers.append((b"accept-encoding", b"identity"))
        return headers

    async def forward(
        self, scope: Scope, receive: Receive, send: Send, *, raw_target: bytes, max_body: int
    ) -> None:
        """Stream the caller's request to the upstream and the upstream's reply to the caller."""
        method: str = scope["method"]
        headers = self.request_headers(scope)
        length = _content_length(headers)
        if length == -1:
            await stripe_error(400, "The Content-Length header is invalid.")(scope, receive, send)
            return
        if length is not None and length > max_body:
            await too_large(max_body)(scope, receive, send)
            return
        chunked = any(key.lower() == b"transfer-encoding" for key, _ in scope["headers"])
        content: bytes | AsyncIterator[bytes] = b""
        if (length is not None and length > 0) or (length is None and chunked):
            content = _stream_body(receive, max_body)
        request = self._client.build_request(
            method, self.url(raw_target), headers=headers, content=content
        )
        try:
            response = await self._client.send(request, stream=True)
        except _BodyTooLargeError:
            await too_large(max_body)(scope, receive, send)
            return
        except _CallerGoneError:
            return
        except httpx.HTTPError as exc:
            await send_reply(_gateway_error(exc, method, scope["path"]), send)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": _reply_headers(response.headers.raw),
                }
            )
            async for chunk in _raw_chunks(response):
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            # The status line is out: leaving the response incomplete makes the server close the
            # connection, which is how a client learns that the body was cut short.
            log.warning(
                "upstream %s %s: reply cut short (%s)", method, scope["path"], type(exc).__name__
            )
        finally:
            await response.aclose()

    async def exchange(self, scope: Scope, *, raw_target: bytes, body: bytes) -> UpstreamReply:
        """Send the caller's request with an already read ``body``; return the whole reply."""
        method: str = scope["method"]
        request = self._client.build_request(
            method,
            self.url(raw_target),
            headers=self.request_headers(scope, identity=True),
            content=body,
        )
        try:
            response = await self._client.send(request, stream=True)
            try:
                content = b"".join([chunk async for chunk in _raw_chunks(response)])
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            return _gateway_error(exc, method, scope["path"])
        return UpstreamReply(response.status_code, _reply_headers(response.headers.raw), content)


async def _raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The reply body as it came off the wire (a transport that hands over a body already read,
    such as httpx's MockTransport, gives it in one piece)."""
    if response.is_stream_consumed:
        yield response.content
        return
    async for chunk in response.aiter_raw():
        yield chunk


def _content_length(headers: Headers) -> int | None:
    """The declared body length; ``None`` when absent, -1 when unreadable or contradictory."""
    values = {value.strip() for key, value in headers if key.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1 or not next(iter(values)).isdigit():
        return -1
    return int(next(iter(values)))


async def _stream_body(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The caller's body, chunk by chunk as it arrives, refused once it passes ``limit`` bytes."""
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _CallerGoneError
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLargeError
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
