"""Opening Redis connections and mapping redis-py's errors onto ours, at one boundary.

One configuration reaches a single server (``redis://``), a Redis Cluster
(``redis+cluster://seed1,seed2``) or a master watched by Redis Sentinel
(``redis+sentinel://s1,s2/mymaster``), see ``dualwrite.redis_url``. A Sentinel-managed client is a
plain ``redis.asyncio.Redis`` whose pool asks the sentinels for the master, and again when a
connection fails or finds a replica where the master was (a failover). The storage modules are written
against ``redis.asyncio.Redis``; ``RedisCluster`` shares its command mixins, and the places where a
cluster differs go through the helpers here: reading several outbox streams at once
(``read_groups``), walking every key (``scan_keys``), subscribing (``open_pubsub``) and telling the
two apart (``is_cluster``).
Every script and ``MULTI`` touches one hash tag (``dualwrite.keys``), so all of them run unchanged on
a cluster; cluster transactions go through ``_SlotTransaction`` (see there why).

redis-py's asyncio client is typed loosely (``bytes | str``); the helpers here narrow what the storage
modules read back.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import (
    ClusterNode,
    ClusterPipeline,
    PipelineCommand,
    RedisCluster,
    TransactionStrategy,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.typing import KeyT, StreamIdT

from dualwrite.config import RedisSettings
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.redis_url import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    parse_cluster_url,
    parse_sentinel_url,
)

__all__ = [
    "RedisError",
    "StreamEntry",
    "as_int",
    "as_str",
    "as_str_list",
    "is_cluster",
    "open_pubsub",
    "open_redis",
    "read_groups",
    "scan_keys",
    "store_errors",
    "stream_entries",
    "streams_reply",
]

StreamEntry = tuple[str, dict[str, str]]
"""A stream entry as read back: its id and its fields."""


#: How often an idle worker polls a cluster's outbox streams (a blocking read spans one slot only).
CLUSTER_POLL_SECONDS = 0.05


def open_redis(settings: RedisSettings, *, max_connections: int = 256) -> aioredis.Redis:
    """A client for ``settings.url`` that decodes replies to ``str`` and fails fast when Redis is down.

    The short timeouts matter on the request path: a stage lookup must fall back to the safe stage
    quickly rather than hang a usage request while Redis restarts. A ``redis+cluster://`` URL gives
    a ``RedisCluster`` (``max_connections`` then applies per node).
    """
    if settings.url.startswith(CLUSTER_SCHEMES):
        return _open_cluster(settings, max_connections=max_connections)
    if settings.url.startswith(SENTINEL_SCHEMES):
        return _open_sentinel(settings, max_connections=max_connections)
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


class _SentinelRedis(aioredis.Redis):
    """The master's client, closing its sentinels' connections with its own."""

    watched_by: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the master's pool, then the connections to the sentinels."""
        await super().aclose(close_connection_pool)
        if self.watched_by is not None:
            for client in self.watched_by.sentinels:
                await client.aclose()


def _open_sentinel(settings: RedisSettings, *, max_connections: int) -> aioredis.Redis:
    address = parse_sentinel_url(settings.url)
    timeouts = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
    }
    sentinel = Sentinel(
        list(address.sentinels),
        sentinel_kwargs=dict(timeouts),
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
    )
    client: _SentinelRedis = sentinel.master_for(
        address.service,
        redis_class=_SentinelRedis,
        db=address.db,
        username=address.username,
        password=address.password,
        ssl=address.tls,
        decode_responses=True,
        max_connections=max_connections,
        health_check_interval=30,
        # As for one server; a connection refused by the old master (or answering READONLY, a
        # replica now) asks the sentinels again on the next attempt.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    )
    client.watched_by = sentinel
    return client


class _SlotTransaction(TransactionStrategy):
    """MULTI/EXEC on the one slot its keys share, queued in the caller's event loop.

    redis-py queues each command of a cluster transaction through ``asyncio.run`` in a new thread
    (to find its slot); a client not yet initialized then opens its connections in that thread's
    loop and fails on them later, and every queued command costs a thread. dualwrite's
    transactions name their key first (``EVAL``: after the key count), so the slot is computed
    here, and the client is initialized in the caller's loop before ``EXEC``.
    """

    def execute_command(self, *args: Any, **kwargs: Any) -> ClusterPipeline:
        name = str(args[0]).upper()
        if name in ("EVAL", "EVALSHA") and len(args) > 3 and int(args[2]) > 0:
            key = args[3]
        elif name not in _KEYLESS and name not in ("EVAL", "EVALSHA") and len(args) > 1:
            key = args[1]
        else:
            msg = f"{name} names no key: it cannot join a cluster transaction"
            raise RedisClusterException(msg)
        self._pipeline_slots.add(self._pipe.cluster_client.keyslot(key))
        self._command_queue.append(PipelineCommand(len(self._command_queue), *args, **kwargs))
        return self._pipe

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        await self._pipe.cluster_client.initialize()  # once; later calls return at once
        return await super().execute(raise_on_error, allow_redirections)


_KEYLESS = frozenset({"MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH", "PING", "SCRIPT", "PUBLISH"})


class _Cluster(RedisCluster):
    """``RedisCluster`` whose transactions are ``_SlotTransaction``s."""

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        """A pipeline; with ``transaction``, MULTI/EXEC on the one slot of its keys."""
        pipe = super().pipeline(transaction, shard_hint)
        if transaction:
            pipe._execution_strategy = _SlotTransaction(pipe)
        return pipe


def _open_cluster(settings: RedisSettings, *, max_connections: int) -> aioredis.Redis:
    address = parse_cluster_url(settings.url)
    cluster = _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.seeds],
        username=address.username,
        password=address.password,
        ssl=address.tls,
        decode_responses=True,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        max_connections=max_connections,
        health_check_interval=30,
        # MOVED / ASK redirects are followed apart from these retries; the retries cover a node
        # that went away (its slots are looked up again before the next attempt).
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=3),
        # redis-py's default rebuilds the slot map after every 5th MOVED by closing every
        # connection, in-flight commands of other tasks included (a script that ran but lost its
        # reply would be retried); 0 instead patches the map from each MOVED reply.
        reinitialize_steps=0,
    )
    # Typed as the single-server client the storage modules are written against: both share the
    # command mixins dualwrite uses, and the differences are handled by the helpers below.
    return cast(aioredis.Redis, cluster)


def is_cluster(client: object) -> bool:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)


async def read_groups(
    client: aioredis.Redis,
    group: str,
    consumer: str,
    streams: Mapping[str, str],
    *,
    count: int,
    block_ms: int | None,
) -> object:
    """XREADGROUP over several streams, as one reply in XREADGROUP's shape.

    One server: a single (blocking) call. A cluster refuses a multi-key command across slots, and
    the shards' streams sit in different slots, so each stream is read without blocking (one
    pipeline, sent to every node at once; at most ``count`` entries in all, where one server
    returns up to ``count`` per stream); when all are empty the call waits up to ``block_ms``
    (at most ``CLUSTER_POLL_SECONDS``) and returns nothing, like a blocking read that timed out.
    """
    if not is_cluster(client):
        wanted: dict[KeyT, StreamIdT] = {name: last for name, last in streams.items()}
        return await client.xreadgroup(group, consumer, wanted, count=count, block=block_ms)
    # COUNT applies per stream: ask for at most ``count`` in all, from a random starting stream
    # so that no shard waits behind the others when there are more shards than ``count``.
    names = list(streams)
    start = random.randrange(len(names)) if names else 0
    chosen = (names[start:] + names[:start])[: max(count, 1)]
    pipe = client.pipeline(transaction=False)
    for stream in chosen:
        pipe.xreadgroup(
            group, consumer, {stream: streams[stream]}, count=max(count // len(chosen), 1)
        )
    replies = await pipe.execute()
    merged: list[object] = []
    for reply in replies:
        if isinstance(reply, dict):  # RESP3 shape
            merged.extend([name, entries] for name, entries in reply.items())
        elif isinstance(reply, list | tuple):
            merged.extend(reply)
    if not merged and block_ms:
        await anyio.sleep(min(block_ms / 1000, CLUSTER_POLL_SECONDS))
    return merged


async def open_pubsub(client: aioredis.Redis) -> PubSub:
    """A pub/sub session that drops subscribe confirmations. On a cluster it connects to the node
    serving the channel's slot (classic ``PUBLISH`` reaches every node); the slot map is loaded
    first, which the cluster's pub/sub needs before its first ``SUBSCRIBE``."""
    if is_cluster(client):
        cluster = cast(RedisCluster, client)
        await cluster.initialize()
        return cluster.pubsub(ignore_subscribe_messages=True)
    return client.pubsub(ignore_subscribe_messages=True)


async def scan_keys(client: aioredis.Redis, match: str, *, count: int = 1000) -> list[str]:
    """Every key matching ``match``: on a cluster, SCAN runs on every primary."""
    if is_cluster(client):
        cluster = cast(RedisCluster, client)
        found = [
            str(as_str(key))
            async for key in cluster.scan_iter(
                match=match, count=count, target_nodes=RedisCluster.PRIMARIES
            )
        ]
        return found
    return [str(as_str(key)) async for key in client.scan_iter(match=match, count=count)]


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
