"""``DurabilityGuard``: what one process does about Redis durability, the start-up check of its
settings, then the watch of the data-loss markers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from dualwrite import instruments
from dualwrite.config import RedisSettings
from dualwrite.durability._marker import (
    CHECK_SCRIPT,
    RECLEAR_HINT,
    RECORD_SCRIPT,
    DataLoss,
    earliest,
    loss_of,
    marker_keys,
    utc,
)
from dualwrite.durability._settings import (
    Persistence,
    RedisDurability,
    check_settings,
    read_durability,
)
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.keys import KeySpace
from dualwrite.redis_client import as_int, as_str, store_errors

__all__ = ["CHECK_SECONDS", "SETTINGS_SECONDS", "DurabilityGuard"]

log = logging.getLogger("dualwrite.durability")

#: How often each process checks the markers (one script per marker, in one round trip).
CHECK_SECONDS = 5.0
#: How often the persistence and eviction settings are read again while running.
SETTINGS_SECONDS = 60.0
#: Beats remembered per marker, to date a rollback (100 checks: several minutes).
_HISTORY = 100


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
        self._check = redis.register_script(CHECK_SCRIPT)
        self._record = redis.register_script(RECORD_SCRIPT)
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
        # A loss is detected when the replies arrive, not when the check began: a command sent
        # before a restart may be answered (redis-py resends it) by the emptied server.
        answered = self._clock()
        recorded: DataLoss | None = None
        detected: DataLoss | None = None
        gone: list[str] = []
        for key, reply in zip(keys, replies, strict=True):
            fields = [str(as_str(value) or "") for value in reply]
            marker_id, beat, created = fields[0], as_int(fields[1]), fields[2] == "1"
            recorded = earliest(recorded, loss_of(fields[3:5]))
            loss_since = self._compare(key, marker_id, beat, created, now)
            if loss_since is not None:
                gone.append(key)
                detected = earliest(detected, DataLoss(since=loss_since, detected_at=answered))
        if detected is not None:
            # What this process knew before the loss is carried into the new markers.
            recorded = earliest(recorded, self.lost, detected) or detected
            async with store_errors("recording a Redis data loss"):
                for key in keys:
                    await self._record(keys=[key], args=[recorded.since, recorded.detected_at])
            self._report(recorded, gone)
        elif recorded is not None and self.lost is None:
            log.warning(
                "Redis lost data after %s (recorded in its data-loss markers): the report does "
                "not claim parity; %s",
                utc(recorded.since),
                RECLEAR_HINT,
            )
        self.lost = recorded
        instruments.set_redis_data_lost(recorded is not None)
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
        instruments.count_redis_data_loss()
        log.error(
            "REDIS LOST DATA: the data-loss marker(s) %s were gone, replaced or rolled back, "
            "after %s. Outbox entries, ledger rows, stages and idempotency records may be gone, "
            "so the report no longer claims parity; %s",
            ", ".join(keys),
            utc(loss.since),
            RECLEAR_HINT,
        )
