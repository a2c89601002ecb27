"""dualwrite: move Stripe usage billing from legacy usage records to Billing Meters, safely.

The public API is re-exported here; import it from ``dualwrite`` rather than from the modules. The
demo (``dualwrite.demo``) and the Stripe stand-in (``dualwrite.testing``) are left out on purpose:
they pull in a server and test helpers that an application never needs at import time.
"""

from __future__ import annotations

from dualwrite.config import MeterMapping, Settings, UsageRoute
from dualwrite.engine import DualWriteEngine, StageSource
from dualwrite.exceptions import (
    ClientDisconnectedError,
    ConfigError,
    ConflictError,
    DualwriteError,
    IdempotencyError,
    PriceError,
    RedisEvictionError,
    StoreUnavailableError,
    UsageInputError,
)
from dualwrite.flags import AuditEntry, RedisFlagStore, Resolution, StageResolver
from dualwrite.ledger import DivergenceRecord, Ledger
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import (
    Leg,
    RecordOutcome,
    Stage,
    StagePlan,
    StripeFailure,
    UsageEvent,
    WriteResult,
    plan_for,
)
from dualwrite.outbox import Outbox, OutboxDepth, OutboxWorker
from dualwrite.recorder import Recorder, SyncRecorder
from dualwrite.report import CustomerReport, LegTotals, Report, build_report, render_table

__all__ = [
    "AuditEntry",
    "ClientDisconnectedError",
    "ConfigError",
    "ConflictError",
    "CustomerReport",
    "DivergenceRecord",
    "DualWriteEngine",
    "DualWriteMiddleware",
    "DualwriteError",
    "IdempotencyError",
    "Ledger",
    "Leg",
    "LegTotals",
    "MeterMapping",
    "Outbox",
    "OutboxDepth",
    "OutboxWorker",
    "PriceError",
    "RecordOutcome",
    "Recorder",
    "RedisEvictionError",
    "RedisFlagStore",
    "Report",
    "Resolution",
    "Settings",
    "Stage",
    "StagePlan",
    "StageResolver",
    "StageSource",
    "StoreUnavailableError",
    "StripeFailure",
    "SyncRecorder",
    "UsageEvent",
    "UsageInputError",
    "UsageRoute",
    "WriteResult",
    "build_report",
    "plan_for",
    "render_table",
]


def __getattr__(name: str) -> str:
    # The version is read from the installed metadata only when asked for (stamina's pattern), so
    # that importing dualwrite does not pay for importlib.metadata.
    if name != "__version__":
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)

    from importlib.metadata import version

    return version("dualwrite")
