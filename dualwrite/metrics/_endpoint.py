"""``/metrics``: the endpoint (``MetricsApp``), the gauges it reads from Redis when scraped
(``OutboxSampler``), and a server of its own for ``dualwrite worker --metrics-port``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from dualwrite._bearer import BearerGate
from dualwrite._http import stripe_error
from dualwrite.exceptions import DualwriteError, StoreUnavailableError
from dualwrite.instruments import REGISTRY
from dualwrite.keys import KeySpace
from dualwrite.outbox import Outbox, OutboxDepth
from dualwrite.redis_client import store_errors
from dualwrite.server_thread import serve_in_thread
from dualwrite.stores import Stores

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from dualwrite.config import Settings
    from dualwrite.engine import DualWriteEngine

__all__ = [
    "SAMPLE_TIMEOUT",
    "MetricsApp",
    "OutboxReading",
    "OutboxSampler",
    "metrics_app",
    "serve_metrics",
]

#: The longest a scrape waits for Redis before answering without the outbox gauges.
SAMPLE_TIMEOUT = 2.0


# -- Redis state (read at scrape time) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxReading:
    """The outbox as one read saw it."""

    depth: OutboxDepth
    oldest_age: float
    """Seconds since the oldest outstanding entry was enqueued (0: none)."""
    divergences: int
    """Entries in the divergence log, over all shards."""


class OutboxSampler:
    """Reads the outbox depth, its oldest entry's age and the divergence log's length from Redis.

    ``refresh()`` reads (async, at most ``SAMPLE_TIMEOUT`` seconds); ``families()`` yields the
    last reading as gauges (``dualwrite_redis_up`` 0 and nothing else when Redis did not answer).
    The age of the oldest entry is the oldest ``enqueued_at`` among each shard's stream head and
    both ends of its retry set: exact for entries waiting in a stream, a lower bound for entries
    waiting out a backoff.
    """

    def __init__(
        self,
        outbox: Outbox,
        redis: aioredis.Redis,
        keys: KeySpace,
        *,
        owned: bool = False,
        clock: Any = time.time,
    ) -> None:
        self._outbox = outbox
        self._redis = redis
        self._keys = keys
        self._owned = owned
        self._clock = clock
        self._lock = asyncio.Lock()
        self._families: list[Metric] = []

    @classmethod
    def of(cls, settings: Settings, engine: DualWriteEngine | None = None) -> OutboxSampler:
        """A sampler over ``engine``'s Redis, or over a connection of its own (see ``aclose``)."""
        if engine is not None:
            stores = engine.stores
            return cls(stores.outbox, stores.redis, stores.keys)
        stores = Stores.open(settings, max_connections=4)
        return cls(stores.outbox, stores.redis, stores.keys, owned=True)

    async def refresh(self) -> None:
        """Read the outbox state from Redis now (never raises: a failure reads as Redis down)."""
        async with self._lock:
            try:
                async with asyncio.timeout(SAMPLE_TIMEOUT):
                    self._families = _families(await self.read())
            except (StoreUnavailableError, RedisError, OSError, TimeoutError):
                self._families = [_gauge("dualwrite_redis_up", "Whether Redis answered.", 0)]

    async def read(self) -> OutboxReading:
        """The outbox's depth, its oldest entry's age and the divergence log's length, read now
        (the health checks read it too).

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        async with store_errors("reading the outbox"):
            depth = await self._outbox.depth()
            oldest: float | None = None
            divergences = 0
            for shard in self._keys.all_shards():
                pipe = self._redis.pipeline(transaction=False)
                pipe.xrange(shard.outbox, count=1)
                pipe.zrange(shard.retry, 0, 0)
                pipe.zrange(shard.retry, -1, -1)
                pipe.xlen(shard.divergence)
                head, first_retry, last_retry, length = await pipe.execute()
                divergences += int(length or 0)
                payloads = [fields.get("entry", "") for _, fields in head or []]
                for payload in [*payloads, *(first_retry or []), *(last_retry or [])]:
                    enqueued = _enqueued_at(payload)
                    if enqueued is not None and (oldest is None or enqueued < oldest):
                        oldest = enqueued
        age = 0.0 if oldest is None else max(0.0, self._clock() - oldest)
        return OutboxReading(depth=depth, oldest_age=age, divergences=divergences)

    def families(self) -> list[Metric]:
        """The gauges of the last ``refresh()``."""
        return list(self._families)

    async def aclose(self) -> None:
        """Close the Redis connection the sampler opened (none when it shares an engine's)."""
        if self._owned:
            await self._redis.aclose()


def _families(reading: OutboxReading) -> list[Metric]:
    """The gauges of one reading."""
    entries = GaugeMetricFamily(
        "dualwrite_outbox_entries",
        "Outbox entries by state, over all shards.",
        labels=["state"],
    )
    for state in ("ready", "pending", "scheduled", "dead"):
        entries.add_metric([state], getattr(reading.depth, state))
    return [
        _gauge("dualwrite_redis_up", "Whether Redis answered.", 1),
        entries,
        _gauge(
            "dualwrite_outbox_oldest_age_seconds",
            "Age of the oldest outstanding outbox entry (0: none).",
            reading.oldest_age,
        ),
        _gauge(
            "dualwrite_divergence_log_entries",
            "Entries in the divergence log (capped), over all shards.",
            reading.divergences,
        ),
    ]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _enqueued_at(payload: Any) -> float | None:
    """An outbox payload's ``enqueued_at`` (``None``: unreadable)."""
    try:
        value = json.loads(payload).get("enqueued_at")
    except (TypeError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


class _Exposition(Collector):
    """What one ``/metrics`` endpoint shows: the process's metrics and its sampler's gauges."""

    def __init__(self, sampler: OutboxSampler | None) -> None:
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        if self._sampler is not None:
            yield from self._sampler.families()


# -- the endpoint --------------------------------------------------------------------------------


class MetricsApp:
    """``/metrics`` as an ASGI app: the Prometheus text format (or OpenMetrics, when asked).

    Mount it anywhere (``Mount("/metrics", metrics_app(settings))``): it answers GET and HEAD on
    any path below its mount point.

    Args:
        settings: Redis (for the outbox gauges) and ``DUALWRITE_METRICS_TOKEN``; ``None``: the
            process's counters only, no token.
        engine: an engine whose Redis to share for the outbox gauges.
        token: the bearer token to ask for, instead of the settings' one.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        engine: DualWriteEngine | None = None,
        token: str | None = None,
    ) -> None:
        self.sampler = OutboxSampler.of(settings, engine) if settings is not None else None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Exposition(self.sampler))
        if token is None and settings is not None:
            token = settings.metrics_token_value()
        self._app: ASGIApp = BearerGate(
            self._serve,
            token,
            variable="DUALWRITE_METRICS_TOKEN",
            realm="dualwrite metrics",
            required=False,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._app(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            await send({"type": "websocket.close", "code": 1003})

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            response = stripe_error(405, "/metrics answers GET only.")
            await response(scope, receive, send)
            return
        if self.sampler is not None:
            await self.sampler.refresh()
        accept = ""
        for name, value in scope.get("headers", []):
            if name == b"accept":
                accept = value.decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body = encoder(self._registry)
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    async def aclose(self) -> None:
        """Close the Redis connection the app opened, if any."""
        if self.sampler is not None:
            await self.sampler.aclose()


def metrics_app(
    settings: Settings | None = None,
    *,
    engine: DualWriteEngine | None = None,
    token: str | None = None,
) -> MetricsApp:
    """``/metrics`` as an ASGI app (the arguments are ``MetricsApp``'s)."""
    return MetricsApp(settings, engine=engine, token=token)


@contextmanager
def serve_metrics(
    settings: Settings, *, host: str, port: int, app: ASGIApp | None = None
) -> Iterator[int]:
    """Serve ``/metrics`` with uvicorn in a background thread (``dualwrite worker
    --metrics-port``); yields the port it listens on (``port=0`` picks a free one).

    ``app`` serves instead of ``MetricsApp(settings)`` (the worker's, with its health endpoints);
    its lifespan runs, so it can close what it opened.

    Raises:
        DualwriteError: the server did not start listening.
    """
    import uvicorn

    config = uvicorn.Config(
        app or MetricsApp(settings),
        host=host,
        port=port,
        lifespan="on",  # closes the sampler's Redis connection at shutdown
        access_log=False,
        log_config=None,
        log_level="warning",
        server_header=False,
    )
    failure = DualwriteError(f"the metrics endpoint could not start listening on {host}:{port}")
    with serve_in_thread(
        uvicorn.Server(config), name="dualwrite-metrics", failure=failure, grace=1.0
    ) as bound:
        yield bound
