"""The operations audit stream (``P:{ops}:audit``): who ran which migration step, when, with what."""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from dualwrite.keys import KeySpace
from dualwrite.redis_client import as_str, store_errors, stream_entries

__all__ = ["OpsAudit", "OpsAuditEntry"]

_MAXLEN = 100_000


class OpsAuditEntry(BaseModel):
    """One operation: when, who, what (``meters.apply``, ``backfill``) and its details."""

    model_config = ConfigDict(frozen=True)

    id: str
    at: float
    actor: str
    action: str
    details: dict[str, Any]


class OpsAudit:
    """Appends to, and reads, the operations audit stream."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace):
        self._redis = redis
        self._keys = keys

    async def record(self, action: str, *, actor: str, details: dict[str, Any]) -> str:
        """Append one entry (details must hold no secret) and return its id.

        Raises:
            StoreUnavailableError: Redis could not take it.
        """
        fields = {
            "at": f"{time.time():.3f}",
            "actor": actor,
            "action": action,
            "details": json.dumps(details, sort_keys=True),
        }
        async with store_errors("writing the operations audit"):
            entry_id = await self._redis.xadd(
                self._keys.ops_audit,
                fields,  # type: ignore[arg-type]
                maxlen=_MAXLEN,
                approximate=True,
            )
        return str(as_str(entry_id))

    async def entries(self, *, limit: int = 100) -> list[OpsAuditEntry]:
        """The newest entries, newest first."""
        async with store_errors("reading the operations audit"):
            raw = await self._redis.xrevrange(self._keys.ops_audit, count=limit)
        return [
            OpsAuditEntry(
                id=entry_id,
                at=float(fields.get("at", 0)),
                actor=fields.get("actor", ""),
                action=fields.get("action", ""),
                details=json.loads(fields.get("details") or "{}"),
            )
            for entry_id, fields in stream_entries(raw)
        ]
