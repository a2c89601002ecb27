"""The stores, opened once from settings and passed to whoever needs them (uvicorn's ``Config.load()``).

``Stores.open(settings)`` is the one place in dualwrite that opens Redis and lays out its key space
(``tests/engine/test_stores.py`` holds every other module to it): the engine, the front doors, the
worker, the CLI commands and the report, admin and metrics apps take a ``Stores`` (or the store
they need from it) instead of opening their own. ``Stores.on(redis, settings)`` wraps a client
someone else opened and closes.

The ledger reader, the outbox and the flag store are built on first use: a CLI command that only
reads dead letters does not import the outbox's delivery (and the Stripe SDK with it).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from dualwrite.keys import KeySpace
from dualwrite.redis_client import open_redis

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from dualwrite.config import Settings
    from dualwrite.flags import RedisFlagStore
    from dualwrite.ledger import Ledger
    from dualwrite.outbox import Outbox

__all__ = ["Stores"]


class Stores:
    """One Redis client, dualwrite's key space on it, and the stores built on the two.

    Build it with ``Stores.open(settings)`` (it then owns the client: ``aclose()`` or ``async with``
    closes it) or ``Stores.on(redis, settings)`` (whoever opened ``redis`` closes it).
    """

    __slots__ = ("_flags", "_ledger", "_outbox", "_settings", "keys", "owned", "redis")

    def __init__(self, redis: aioredis.Redis, settings: Settings, *, owned: bool = False) -> None:
        self.redis = redis
        """The client every store shares."""
        self.keys = KeySpace(settings.redis.key_prefix, settings.redis.shards)
        """dualwrite's key layout under ``[redis] key_prefix``."""
        self.owned = owned
        """``aclose()`` closes ``redis``."""
        self._settings = settings
        self._ledger: Ledger | None = None
        self._outbox: Outbox | None = None
        self._flags: RedisFlagStore | None = None

    @classmethod
    def open(cls, settings: Settings, *, max_connections: int = 256) -> Stores:
        """Open a Redis client for ``settings.redis`` (no connection is made yet) and own it."""
        return cls(
            open_redis(settings.redis, max_connections=max_connections), settings, owned=True
        )

    @classmethod
    def on(cls, redis: aioredis.Redis, settings: Settings) -> Stores:
        """The stores on a client opened elsewhere (and closed there)."""
        return cls(redis, settings)

    @property
    def ledger(self) -> Ledger:
        """The ledger's reader (one per ``Stores``)."""
        if self._ledger is None:
            from dualwrite.ledger import Ledger  # deferred: start-up cost

            maxlen = self._settings.ledger.divergence_maxlen
            self._ledger = Ledger(self.redis, self.keys, divergence_maxlen=maxlen)
        return self._ledger

    @property
    def outbox(self) -> Outbox:
        """The outbox streams (one per ``Stores``, on ``ledger``)."""
        if self._outbox is None:
            from dualwrite.outbox import Outbox  # deferred: start-up cost (stripe)

            self._outbox = Outbox(self.redis, self.keys, self._settings.outbox, self.ledger)
        return self._outbox

    @property
    def flags(self) -> RedisFlagStore:
        """The stage flags, on this host's clock (one per ``Stores``)."""
        if self._flags is None:
            from dualwrite.flags import RedisFlagStore  # deferred: start-up cost (stripe)

            self._flags = RedisFlagStore(self.redis, self.keys)
        return self._flags

    async def aclose(self) -> None:
        """Close the Redis client if these stores opened it."""
        if self.owned:
            await self.redis.aclose()

    async def __aenter__(self) -> Stores:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
