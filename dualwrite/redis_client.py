"""Opening Redis connections and mapping redis-py's errors onto ours, at one boundary.

redis-py's asyncio client is typed loosely (``bytes | str``); the helpers here narrow what the storage
modules read back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from dualwrite.config import RedisSettings
from dualwrite.exceptions import StoreUnavailableError

__all__ = [
    "RedisError",
    "StreamEntry",
    "as_int",
    "as_str",
    "as_str_list",
    "open_redis",
    "store_errors",
    "stream_entries",
    "streams_reply",
]

StreamEntry = tuple[str, dict[str, str]]
"""A stream entry as read back: its id and its fields."""


def open_redis(settings: RedisSettings, *, max_connections: int = 256) -> aioredis.Redis:
    """A client for ``settings.url`` that decodes replies to ``str`` and fails fast when Redis is down.

    The short timeouts matter on the request path: a stage lookup must fall back to the safe stage
    quickly rather than hang a usage request while Redis restarts.
    """
    return aioredis.Redis.from_url(
        settings.url,
        decode_responses=True,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        max_connections=max_connections,
        health_check_interval=30,
        # One quick retry rides over a connection Redis closed (a restart); redis-py's default (10
        # retries, up to 1 s apart) would hold a usage request for seconds during an outage.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    )


@asynccontextmanager
async def store_errors(action: str) -> AsyncIterator[None]:
    """Translate any redis-py error raised inside into ``StoreUnavailableError``.

    The message names the action but never the server address (it may carry a password).
    """
    try:
        yield
    except ResponseError as exc:
        # The server answered, with an error: its text carries no address and says what went wrong.
        msg = f"Redis refused a command while {action}: {exc}"
        raise StoreUnavailableError(msg) from exc
    except (RedisError, OSError) as exc:
        msg = f"Redis unavailable while {action} ({type(exc).__name__})"
        raise StoreUnavailableError(msg) from exc


def as_str(value: object) -> str | None:
    """Narrow a Redis reply to ``str`` (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def as_int(value: object, default: int = 0) -> int:
    """Narrow a Redis reply to ``int``."""
    if value is None:
        return default
    if isinstance(value, bytes):
        value = value.decode()
    return int(str(value))


def as_str_list(value: object) -> list[str]:
    """Narrow a Redis array reply of strings (``None`` items are dropped)."""
    if not isinstance(value, list | tuple):
        return []
    return [text for item in value if (text := as_str(item)) is not None]


def stream_entries(value: object) -> list[StreamEntry]:
    """Narrow an XRANGE / XREVRANGE / XAUTOCLAIM entry list; deleted entries (``None`` fields)
    are dropped."""
    entries: list[StreamEntry] = []
    if not isinstance(value, list | tuple):
        return entries
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2 or not isinstance(item[1], dict):
            continue
        fields = {str(as_str(k)): str(as_str(v)) for k, v in item[1].items()}
        entries.append((str(as_str(item[0])), fields))
    return entries


def streams_reply(value: object) -> list[tuple[str, list[StreamEntry]]]:
    """Narrow an XREAD / XREADGROUP reply: (stream name, entries) per stream."""
    if isinstance(value, dict):  # RESP3 shape
        return [(str(as_str(name)), stream_entries(entries)) for name, entries in value.items()]
    if not isinstance(value, list | tuple):
        return []
    return [
        (str(as_str(item[0])), stream_entries(item[1]))
        for item in value
        if isinstance(item, list | tuple) and len(item) == 2
    ]
