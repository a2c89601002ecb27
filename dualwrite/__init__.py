"""dualwrite: move Stripe usage billing from legacy usage records to Billing Meters, safely.

The public API is re-exported here; import it from ``dualwrite`` rather than from the modules. The
demo (``dualwrite.demo``) and the Stripe stand-in (``dualwrite.testing``) are left out on purpose:
they pull in a server and test helpers that an application never needs at import time.
"""

from __future__ import annotations

from dualwrite.config import MeterMapping, Settings, UsageRoute
from dualwrite.engine import DualWriteEngine, StageSource
from dualwrite.exceptions import (
    ApiError,
    BackfillInputError,
    BadQueryError,
    ClientDisconnectedError,
    ConfigError,
    ConflictError,
    CutoverInputError,
    CutoverStripeError,
    DeadLetterNotFoundError,
    DualwriteError,
    EventFetchError,
    EventSignatureError,
    IdempotencyError,
    MigrationStripeError,
    PriceError,
    RateLimitedError,
    RedisEvictionError,
    RedisServerError,
    StoreUnavailableError,
    StripeCallError,
    StripeReadError,
    UnsendableHeaderError,
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
    "ApiError",
    "AuditEntry",
    "BackfillInputError",
    "BadQueryError",
    "ClientDisconnectedError",
    "ConfigError",
    "ConflictError",
    "CustomerReport",
    "CutoverInputError",
    "CutoverStripeError",
    "DeadLetterNotFoundError",
    "DivergenceRecord",
    "DualWriteEngine",
    "DualWriteMiddleware",
    "DualwriteError",
    "EventFetchError",
    "EventSignatureError",
    "IdempotencyError",
    "Ledger",
    "Leg",
    "LegTotals",
    "MeterMapping",
    "MigrationStripeError",
    "Outbox",
    "OutboxDepth",
    "OutboxWorker",
    "PriceError",
    "RateLimitedError",
    "RecordOutcome",
    "Recorder",
    "RedisEvictionError",
    "RedisFlagStore",
    "RedisServerError",
    "Report",
    "Resolution",
    "Settings",
    "Stage",
    "StagePlan",
    "StageResolver",
    "StageSource",
    "StoreUnavailableError",
    "StripeCallError",
    "StripeFailure",
    "StripeReadError",
    "SyncRecorder",
    "UnsendableHeaderError",
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
