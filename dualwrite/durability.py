"""Redis as a database: its persistence and eviction settings checked at start, and a data-loss
marker that finds a Redis which lost data while dualwrite runs.

For dualwrite Redis holds the outbox, the ledger, the stages and the idempotency records: a Redis
that evicts keys, or restarts without persistence, loses usage silently. So every process that
writes (``dualwrite serve``, ``dualwrite worker``, the middleware's lifespan, the demo) runs a
``DurabilityGuard``:

* **At start** it reads ``appendonly``, ``appendfsync``, ``save`` and ``maxmemory-policy`` (on
  each master of a cluster). A policy that can evict dualwrite's keys (``allkeys-*``,
  ``volatile-*``: idempotency records and markers carry TTLs) stops the start with
  ``RedisEvictionError`` naming the setting and the fix, unless ``[redis] allow_eviction``; no
  persistence at all is a loud warning, the ``dualwrite_redis_persistence`` gauge and a line on
  health and the report. A Redis that refuses ``CONFIG`` (some managed services) is said once.
* **While running** it keeps a marker in every slot dualwrite writes to (each shard's, and the
  flags'): a hash with a random id, its creation time and a beat that every check increments.
  A marker that is gone, replaced by another id, or whose beat went backwards (a restart from an
  older snapshot, a failover that lost writes) means Redis lost data: the process logs an error,
  counts it, and writes *when* into the markers (``lost_since``, the earliest instant the loss can
  have started, and ``lost_at``, when it was seen), creating them again so that later losses are
  seen too. The fact survives where the data did not: in the new markers, and in the memory of
  every process that saw it, which writes it back after a further loss. It stays until an
  operator clears it (``dualwrite durability --clear-loss``) after ``dualwrite reconcile``.

A process that starts against an already empty Redis cannot tell a new install from a loss (no
marker to miss): only processes that saw the marker detect its loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from dualwrite import metrics
from dualwrite.config import RedisSettings
from dualwrite.exceptions import RedisEvictionError, StoreUnavailableError
from dualwrite.keys import KeySpace
from dualwrite.redis_client import as_int, as_str, is_cluster, store_errors

__all__ = [
    "CHECK_SECONDS",
    "RECLEAR_HINT",
    "DataLoss",
    "DurabilityGuard",
    "NodeSettings",
    "Persistence",
    "RedisDurability",
    "check_settings",
    "clear_loss",
    "marker_keys",
    "read_durability",
    "read_loss",
]

log = logging.getLogger(__name__)

Persistence = Literal["aof", "rdb", "none", "unknown"]
"""What survives a Redis restart: an append-only file, RDB snapshots only, nothing, or unknown
(``CONFIG`` refused)."""

#: How often each process checks the markers (one script per marker, in one round trip).
CHECK_SECONDS = 5.0
#: How often the persistence and eviction settings are read again while running.
SETTINGS_SECONDS = 60.0
#: What an operator does about a loss.
RECLEAR_HINT = (
    "run `dualwrite reconcile` for the periods since then (Stripe's totals name the customers "
    "whose usage the ledger lost), then `dualwrite durability --clear-loss`"
)
_PARAMETERS = ("appendonly", "appendfsync", "save", "maxmemory-policy")
_GAUGE = {"aof": 2, "rdb": 1, "none": 0, "unknown": -1}
_RANK = {"none": 0, "rdb": 1, "aof": 2}
#: Beats remembered per marker, to date a rollback (100 checks: several minutes).
_HISTORY = 100

# KEYS: marker; ARGV: a new id, now. Creates the marker when missing, else counts a beat. Returns
# id, beat, created ('1' when just created), lost_since, lost_at ('' when unset).
_CHECK = """
local id = redis.call('HGET', KEYS[1], 'id')
if not id then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'created_at', ARGV[2], 'beat', 1)
  return {ARGV[1], '1', '1', '', ''}
end
local beat = redis.call('HINCRBY', KEYS[1], 'beat', 1)
local lost = redis.call('HMGET', KEYS[1], 'lost_since', 'lost_at')
return {id, tostring(beat), '0', lost[1] or '', lost[2] or ''}
"""

# KEYS: marker; ARGV: lost_since, lost_at. Keeps the earliest loss.
_RECORD = """
local since = redis.call('HGET', KEYS[1], 'lost_since')
if not since or tonumber(since) > tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'lost_since', ARGV[1], 'lost_at', ARGV[2])
end
return 1
"""


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
    metrics.set_redis_persistence(_GAUGE[durability.persistence])
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


# ------------------------------------------------------------------------------ data-loss marker


@dataclass(frozen=True, slots=True)
class DataLoss:
    """A data loss recorded in the markers."""

    since: float
    """The earliest instant the loss can have started (Unix seconds): the ledger is incomplete
    from then on."""
    detected_at: float
    """When a process saw it."""

    def as_dict(self) -> dict[str, Any]:
        """For health and JSON: both instants (Unix and UTC) and what to do."""
        return {
            "since": self.since,
            "since_utc": _utc(self.since),
            "detected_at": self.detected_at,
            "detected_at_utc": _utc(self.detected_at),
            "action": RECLEAR_HINT,
        }


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def marker_keys(keys: KeySpace) -> list[str]:
    """Every marker: one per shard, and the flags' (each its own slot)."""
    return [shard.marker for shard in keys.all_shards()] + [keys.flags_marker]


def _loss_of(fields: Sequence[str]) -> DataLoss | None:
    since, at = (fields[0] if fields else ""), (fields[1] if len(fields) > 1 else "")
    if not since:
        return None
    return DataLoss(since=float(since), detected_at=float(at or since))


def _earliest(*losses: DataLoss | None) -> DataLoss | None:
    found = [loss for loss in losses if loss is not None]
    return min(found, key=lambda loss: loss.since) if found else None


async def read_loss(redis: aioredis.Redis, keys: KeySpace) -> DataLoss | None:
    """The loss the markers record (the earliest over all of them), if any.

    Raises:
        StoreUnavailableError: Redis could not be reached.
    """
    found: DataLoss | None = None
    async with store_errors("reading the data-loss markers"):
        for key in marker_keys(keys):
            values = await redis.hmget(key, ["lost_since", "lost_at"])
            found = _earliest(found, _loss_of([str(as_str(value) or "") for value in values]))
    return found


async def clear_loss(redis: aioredis.Redis, keys: KeySpace) -> DataLoss | None:
    """Forget the recorded loss (after ``dualwrite reconcile``); returns what was cleared.

    Raises:
        StoreUnavailableError: Redis could not be reached.
    """
    cleared = await read_loss(redis, keys)
    async with store_errors("clearing the data-loss markers"):
        for key in marker_keys(keys):
            await redis.hdel(key, "lost_since", "lost_at")
    return cleared


@dataclass(slots=True)
class _Seen:
    """What this process last saw of one marker."""

    id: str
    beat: int
    at: float
    history: deque[tuple[int, float]]


class DurabilityGuard:
    """One process's durability duties: the start-up check, then the marker watch.

    Args:
        redis, keys: the process's Redis client and key space.
        settings: ``[redis]`` (``allow_eviction``).
        refuse_eviction: False only for the demo, whose data is thrown away (it warns instead).
        interval: seconds between marker checks.
        clock: where "now" comes from.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        settings: RedisSettings,
        *,
        refuse_eviction: bool = True,
        interval: float = CHECK_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._refuse = refuse_eviction
        self.interval = interval
        self._clock = clock
        self._check = redis.register_script(_CHECK)
        self._record = redis.register_script(_RECORD)
        self._seen: dict[str, _Seen] = {}
        self._task: asyncio.Task[None] | None = None
        self._settings_read_at: float | None = None
        self.durability: RedisDurability | None = None
        """The settings last read (None until Redis answered)."""
        self.lost: DataLoss | None = None
        """The loss the markers record, as of the last check."""
        self.detected = 0
        """Losses this process detected."""

    @property
    def persistence(self) -> Persistence:
        """The persistence last read (``unknown`` before Redis answered)."""
        return self.durability.persistence if self.durability else "unknown"

    async def start(self) -> None:
        """Check the settings and the markers once, then keep checking in the background.

        Redis being down at start is not fatal: the settings are read when it answers.

        Raises:
            RedisEvictionError: see ``check_settings``.
        """
        with contextlib.suppress(StoreUnavailableError):
            await self._read_settings()
        with contextlib.suppress(StoreUnavailableError):
            await self.check()
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="dualwrite-durability")

    async def aclose(self) -> None:
        """Stop checking."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def health(self) -> dict[str, Any]:
        """The lines health and readiness show."""
        return {
            "redis_persistence": self.persistence,
            "redis_data_lost": self.lost.as_dict() if self.lost else None,
        }

    def problems(self) -> list[str]:
        """What makes health ``degraded``: ``redis_data_lost``."""
        return ["redis_data_lost"] if self.lost is not None else []

    def warnings(self) -> list[str]:
        """Settings that risk data, as health lists them: ``redis_persistence_off``,
        ``redis_persistence_rdb_only``, ``redis_evicting`` (allowed by ``allow_eviction``)."""
        found = []
        if self.persistence == "none":
            found.append("redis_persistence_off")
        elif self.persistence == "rdb":
            found.append("redis_persistence_rdb_only")
        if self.durability is not None and self.durability.evicting:
            found.append("redis_evicting")
        return found

    async def _read_settings(self) -> None:
        durability = await read_durability(self._redis)
        first = self.durability is None
        changed = not first and durability != self.durability
        self._settings_read_at = time.monotonic()
        self.durability = durability
        if first:
            check_settings(
                durability, allow_eviction=self._settings.allow_eviction, refuse=self._refuse
            )
        elif changed:
            # Running already: nothing to refuse any more, but the change is said (a failover to a
            # server configured otherwise, a CONFIG SET).
            log.warning("Redis durability settings changed: now %s", durability.describe())
            check_settings(durability, allow_eviction=True, refuse=False)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                read_at = self._settings_read_at
                if read_at is None or time.monotonic() - read_at >= SETTINGS_SECONDS:
                    await self._read_settings()
                await self.check()
            except StoreUnavailableError:
                continue  # Redis down: checked again when it answers
            except Exception:
                log.exception("checking Redis's data-loss markers failed; will retry")

    async def check(self) -> DataLoss | None:
        """Check every marker once (creating missing ones); returns the loss they record.

        Raises:
            StoreUnavailableError: Redis could not be reached.
        """
        now = self._clock()
        keys = marker_keys(self._keys)
        replies = []
        async with store_errors("checking the data-loss markers"):
            for key in keys:
                replies.append(await self._check(keys=[key], args=[uuid.uuid4().hex, now]))
        recorded: DataLoss | None = None
        detected: DataLoss | None = None
        gone: list[str] = []
        for key, reply in zip(keys, replies, strict=True):
            fields = [str(as_str(value) or "") for value in reply]
            marker_id, beat, created = fields[0], as_int(fields[1]), fields[2] == "1"
            recorded = _earliest(recorded, _loss_of(fields[3:5]))
            loss_since = self._compare(key, marker_id, beat, created, now)
            if loss_since is not None:
                gone.append(key)
                detected = _earliest(detected, DataLoss(since=loss_since, detected_at=now))
        if detected is not None:
            # What this process knew before the loss is carried into the new markers.
            recorded = _earliest(recorded, self.lost, detected) or detected
            async with store_errors("recording a Redis data loss"):
                for key in keys:
                    await self._record(keys=[key], args=[recorded.since, recorded.detected_at])
            self._report(recorded, gone)
        elif recorded is not None and self.lost is None:
            log.warning(
                "Redis lost data after %s (recorded in its data-loss markers): the report does "
                "not claim parity; %s",
                _utc(recorded.since),
                RECLEAR_HINT,
            )
        self.lost = recorded
        metrics.set_redis_data_lost(recorded is not None)
        return recorded

    def _compare(
        self, key: str, marker_id: str, beat: int, created: bool, now: float
    ) -> float | None:
        """Remember this sighting of a marker; returns when the loss it shows began, if any."""
        seen = self._seen.get(key)
        since: float | None = None
        if seen is not None and (created or marker_id != seen.id):
            since = seen.at  # it was there then; gone or replaced since
        elif seen is not None and beat <= seen.beat:
            # Restored from an older state (a snapshot, a replica that had not caught up): the
            # writes after the last beat it still holds are gone.
            since = next(
                (at for old, at in reversed(seen.history) if old < beat), seen.history[0][1]
            )
        if seen is None or since is not None:
            self._seen[key] = _Seen(marker_id, beat, now, deque([(beat, now)], maxlen=_HISTORY))
        else:
            seen.beat, seen.at = beat, now
            seen.history.append((beat, now))
        return since

    def _report(self, loss: DataLoss, keys: list[str]) -> None:
        self.detected += 1
        metrics.count_redis_data_loss()
        log.error(
            "REDIS LOST DATA: the data-loss marker(s) %s were gone, replaced or rolled back, "
            "after %s. Outbox entries, ledger rows, stages and idempotency records may be gone, "
            "so the report no longer claims parity; %s",
            ", ".join(keys),
            _utc(loss.since),
            RECLEAR_HINT,
        )
