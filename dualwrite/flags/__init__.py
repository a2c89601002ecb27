"""Stage flags: which migration stage each customer is at, stored in Redis and cached locally.

* ``RedisFlagStore`` changes and reads the flags (every change atomic, audited and published).
* ``resolve_snapshot`` is the pure resolution rule: kill switch → override → schedule → percentage
  rollout → global default.
* ``StageResolver`` answers the request path: cached, invalidated over pub/sub, and falling back to
  the safe stage when Redis fails.
"""

from __future__ import annotations

from dualwrite.flags._models import (
    ROLLOUT_STAGES,
    AuditEntry,
    CustomerBilling,
    FlagSnapshot,
    Resolution,
    ResolutionReason,
)
from dualwrite.flags._resolution import (
    BUCKETS,
    resolve_snapshot,
    rollout_bucket,
    rollout_stage,
    stage_only,
)
from dualwrite.flags._resolver import ResolverStats, StageResolver
from dualwrite.flags._store import RedisFlagStore

__all__ = [
    "BUCKETS",
    "ROLLOUT_STAGES",
    "AuditEntry",
    "CustomerBilling",
    "FlagSnapshot",
    "RedisFlagStore",
    "Resolution",
    "ResolutionReason",
    "ResolverStats",
    "StageResolver",
    "resolve_snapshot",
    "rollout_bucket",
    "rollout_stage",
    "stage_only",
]
