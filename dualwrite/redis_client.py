"""Opening Redis connections and mapping redis-py's errors onto ours, at one boundary.

redis-py's asyncio client is typed loosely (``bytes | str``); the helpers here narrow what the storage
modules read back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from dualwrite.config import RedisSettings
from dualwrite.exceptions import StoreUnavailableError

__all__ = ["RedisError", "as_int", "as_str", "open_redis", "store_errors"]


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
    )


@asynccontextmanager
async def store_errors(action: str) -> AsyncIterator[None]:
    """Translate any redis-py error raised inside into ``StoreUnavailableError``.

    The message names the action but never the server address (it may carry a password).
    """
    try:
        yield
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
