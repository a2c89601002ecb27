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

from dualwrite.durability._guard import CHECK_SECONDS, SETTINGS_SECONDS, DurabilityGuard
from dualwrite.durability._marker import (
    RECLEAR_HINT,
    DataLoss,
    clear_loss,
    marker_keys,
    read_loss,
)
from dualwrite.durability._settings import (
    NodeSettings,
    Persistence,
    RedisDurability,
    check_settings,
    read_durability,
)

__all__ = [
    "CHECK_SECONDS",
    "RECLEAR_HINT",
    "SETTINGS_SECONDS",
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
