"""Redis's durability settings (``appendonly``, ``appendfsync``, ``save``, ``maxmemory-policy``):
read on every master, judged, and the start refused when they can evict dualwrite's keys."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from dualwrite import instruments
from dualwrite.exceptions import RedisEvictionError, StoreUnavailableError
from dualwrite.redis_client import as_str, is_cluster, store_errors

__all__ = ["NodeSettings", "Persistence", "RedisDurability", "check_settings", "read_durability"]

log = logging.getLogger("dualwrite.durability")

Persistence = Literal["aof", "rdb", "none", "unknown"]
"""What survives a Redis restart: an append-only file, RDB snapshots only, nothing, or unknown
(``CONFIG`` refused)."""

_PARAMETERS = ("appendonly", "appendfsync", "save", "maxmemory-policy")
_GAUGE = {"aof": 2, "rdb": 1, "none": 0, "unknown": -1}
_RANK = {"none": 0, "rdb": 1, "aof": 2}


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """One Redis server's durability settings, as ``CONFIG GET`` returned them."""

    node: str
    appendonly: bool
    appendfsync: str
    save: str
    maxmemory_policy: str

    @property
    def persistence(self) -> Persistence:
        """``aof`` with the append-only file on, else ``rdb`` with snapshots, else ``none``."""
        if self.appendonly:
            return "aof"
        return "rdb" if self.save.strip() else "none"

    @property
    def evicts(self) -> bool:
        """Whether ``maxmemory-policy`` can evict dualwrite's keys (``noeviction`` cannot)."""
        return self.maxmemory_policy.startswith(("allkeys-", "volatile-"))

    def describe(self) -> str:
        """The settings in a few words."""
        if self.appendonly:
            saved = f"append-only file (appendfsync {self.appendfsync})"
        elif self.save.strip():
            saved = f"RDB snapshots only (save {self.save!r})"
        else:
            saved = "no persistence (appendonly no, save '')"
        return f"{saved}, maxmemory-policy {self.maxmemory_policy}"


@dataclass(frozen=True, slots=True)
class RedisDurability:
    """The settings of every master (``nodes`` is empty when ``CONFIG`` was refused)."""

    nodes: tuple[NodeSettings, ...]
    refusal: str | None = None
    """Redis's answer to ``CONFIG GET`` when it refused it."""

    @property
    def persistence(self) -> Persistence:
        """The weakest persistence of all masters (``unknown`` when none could be read)."""
        if not self.nodes:
            return "unknown"
        return min((node.persistence for node in self.nodes), key=lambda mode: _RANK[mode])

    @property
    def evicting(self) -> list[NodeSettings]:
        """The masters whose policy can evict keys."""
        return [node for node in self.nodes if node.evicts]

    def describe(self) -> str:
        """Every master's settings, or why they are unknown."""
        if not self.nodes:
            return f"unknown (CONFIG GET refused: {self.refusal})"
        if len({node.describe() for node in self.nodes}) == 1:
            return self.nodes[0].describe()
        return "; ".join(f"{node.node}: {node.describe()}" for node in self.nodes)


async def _config_get(client: Any, name: str, **options: Any) -> str:
    reply = await client.config_get(name, **options)
    value = reply.get(name, "") if isinstance(reply, dict) else ""
    return str(as_str(value) or "")


async def read_durability(redis: aioredis.Redis) -> RedisDurability:
    """Read the durability settings of the server (each master of a cluster).

    Raises:
        StoreUnavailableError: Redis could not be reached (a refused ``CONFIG`` is not an error:
            it comes back as ``refusal``).
    """
    targets: Sequence[tuple[str, dict[str, Any]]] = [("redis", {})]
    if is_cluster(redis):
        cluster = cast(RedisCluster, redis)
        await cluster.initialize()
        targets = [
            (f"{node.host}:{node.port}", {"target_nodes": node}) for node in cluster.get_primaries()
        ]
    nodes = []
    try:
        async with store_errors("reading Redis's persistence settings"):
            for name, options in targets:
                values = [await _config_get(redis, param, **options) for param in _PARAMETERS]
                nodes.append(
                    NodeSettings(
                        node=name,
                        appendonly=values[0].lower() == "yes",
                        appendfsync=values[1],
                        save=values[2],
                        maxmemory_policy=values[3] or "noeviction",
                    )
                )
    except StoreUnavailableError as exc:
        if not isinstance(exc.__cause__, ResponseError):
            raise
        return RedisDurability(nodes=(), refusal=str(exc.__cause__))
    return RedisDurability(nodes=tuple(nodes))


def check_settings(
    durability: RedisDurability, *, allow_eviction: bool, refuse: bool = True
) -> None:
    """Log what the settings risk, set the persistence gauge, and refuse an evicting policy.

    Raises:
        RedisEvictionError: a master can evict keys, ``allow_eviction`` is off and ``refuse`` on.
    """
    instruments.set_redis_persistence(_GAUGE[durability.persistence])
    if durability.refusal is not None:
        log.warning(
            "Redis refused CONFIG GET (%s): its persistence and eviction settings cannot be "
            "checked. Make sure it keeps an append-only file (appendonly yes, appendfsync "
            "everysec or always) and never evicts (maxmemory-policy noeviction)",
            durability.refusal,
        )
        return
    for node in durability.evicting:
        where = "" if node.node == "redis" else f" on {node.node}"
        msg = (
            f"Redis maxmemory-policy is {node.maxmemory_policy}{where}: it can evict dualwrite's "
            "keys (outbox entries, ledger rows, idempotency records), which loses or doubles "
            "usage. Fix: CONFIG SET maxmemory-policy noeviction (and maxmemory-policy noeviction "
            "in redis.conf), or set [redis] allow_eviction = true to accept the risk"
        )
        if refuse and not allow_eviction:
            raise RedisEvictionError(msg)
        log.warning("%s (starting anyway)", msg)
    persistence = durability.persistence
    if persistence == "none":
        log.warning(
            "REDIS HAS NO PERSISTENCE (%s): a Redis restart loses the outbox, the ledger, every "
            "customer's stage and the idempotency records. Fix: appendonly yes with appendfsync "
            "everysec (or always) in redis.conf, and a replica",
            durability.describe(),
        )
    elif persistence == "rdb":
        log.warning(
            "Redis keeps RDB snapshots only (%s): a restart loses what was written since the "
            "last snapshot. Fix: appendonly yes with appendfsync everysec (or always)",
            durability.describe(),
        )
    elif any(node.appendfsync == "no" for node in durability.nodes):
        log.warning(
            "Redis appendfsync is no: a machine crash can lose the last ~30 s of writes; "
            "use everysec or always"
        )
