"""Which headers cross the proxy, and how they are written for aiohttp.

Up go the headers Stripe reads (``FORWARDED_REQUEST_HEADERS``, any ``Stripe-*`` and
``X-Stripe-*``), trimmed of surrounding whitespace; down come every response header, as received,
but the hop-by-hop ones. aiohttp writes header values as UTF-8, so a caller's value that is not
UTF-8 is read as Latin-1, as Starlette reads it; a value with a control character (CR, LF, NUL…)
is refused before anything is sent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from starlette.types import Scope

from dualwrite.exceptions import UnsendableHeaderError

__all__ = [
    "FORWARDED_REQUEST_HEADERS",
    "HOP_BY_HOP_HEADERS",
    "Headers",
    "UnsendableHeaderError",
    "content_length",
    "forwarded_value",
    "is_chunked",
    "reply_headers",
    "request_headers",
]

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

#: What HTTP/1.1 cannot carry in a field value (RFC 9110 §5.5); aiohttp refuses it too.
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

Headers = list[tuple[bytes, bytes]]


def request_headers(scope: Scope, *, identity: bool = False) -> list[tuple[str, str]]:
    """The caller's headers that Stripe reads (``identity``: ask for an uncompressed reply).

    Raises:
        UnsendableHeaderError: a forwarded value holds a character HTTP/1.1 cannot carry.
    """
    headers: list[tuple[str, str]] = []
    for key, value in scope["headers"]:
        if identity and key.lower() in (b"accept-encoding", b"content-length"):
            continue
        sent = forwarded_value(key, value)
        if sent is not None:
            headers.append((key.decode("latin-1"), sent.decode("utf-8")))
    if identity:
        headers.append(("Accept-Encoding", "identity"))
    return headers


def forwarded_value(key: bytes, value: bytes) -> bytes | None:
    """A caller's header value as it goes to Stripe, or None when Stripe does not read ``key``:
    trimmed, and as UTF-8 (a value that is not UTF-8 read as Latin-1, as aiohttp sends it). The
    one rule for both of the proxy's paths (``request_headers``, the fast path's request head).

    Raises:
        UnsendableHeaderError: the value holds a character HTTP/1.1 cannot carry.
    """
    name = key.lower()
    if name not in FORWARDED_REQUEST_HEADERS and not name.startswith(_STRIPE_PREFIXES):
        return None
    # Surrounding whitespace is not part of a field value (RFC 9110 5.5).
    value = value.strip(b" \t")
    if _FORBIDDEN_IN_VALUE.search(value):
        raise UnsendableHeaderError(key.decode("latin-1"))
    if value.isascii():
        return value
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1").encode("utf-8")
    return value


def reply_headers(raw: Sequence[tuple[bytes, bytes]]) -> Headers:
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


def is_chunked(scope: Scope) -> bool:
    """Whether the caller sends a body without a Content-Length."""
    return any(key.lower() == b"transfer-encoding" for key, _ in scope["headers"])


def content_length(headers: list[tuple[str, str]]) -> int | None:
    """The declared body length; ``None`` when absent, -1 when unreadable or contradictory."""
    values = {value.strip() for key, value in headers if key.lower() == "content-length"}
    if not values:
        return None
    if len(values) > 1 or not (value := next(iter(values))).isascii() or not value.isdigit():
        return -1
    return int(value)
