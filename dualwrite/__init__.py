"""dualwrite: move Stripe usage billing from legacy usage records to Billing Meters, safely.

The public API is re-exported here; import it from ``dualwrite`` rather than from the modules. The
demo (``dualwrite.demo``) and the Stripe stand-in (``dualwrite.testing``) are left out on purpose:
they pull in a server and test helpers that an application never needs at import time.
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
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
        FutureTimestampError,
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
    from dualwrite.stores import Stores

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
    "FutureTimestampError",
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
    "Stores",
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

#: Where each public name lives. deferred: start-up cost. The names are imported on first use (PEP
#: 562), so ``import dualwrite`` costs no more than the package itself, and an application pays for
#: the engine, pydantic-settings and stripe only when it touches them.
_EXPORTS: dict[str, str] = {
    "ApiError": "dualwrite.exceptions",
    "AuditEntry": "dualwrite.flags",
    "BackfillInputError": "dualwrite.exceptions",
    "BadQueryError": "dualwrite.exceptions",
    "ClientDisconnectedError": "dualwrite.exceptions",
    "ConfigError": "dualwrite.exceptions",
    "ConflictError": "dualwrite.exceptions",
    "CustomerReport": "dualwrite.report",
    "CutoverInputError": "dualwrite.exceptions",
    "CutoverStripeError": "dualwrite.exceptions",
    "DeadLetterNotFoundError": "dualwrite.exceptions",
    "DivergenceRecord": "dualwrite.ledger",
    "DualWriteEngine": "dualwrite.engine",
    "DualWriteMiddleware": "dualwrite.middleware",
    "DualwriteError": "dualwrite.exceptions",
    "EventFetchError": "dualwrite.exceptions",
    "EventSignatureError": "dualwrite.exceptions",
    "FutureTimestampError": "dualwrite.exceptions",
    "IdempotencyError": "dualwrite.exceptions",
    "Ledger": "dualwrite.ledger",
    "Leg": "dualwrite.models",
    "LegTotals": "dualwrite.report",
    "MeterMapping": "dualwrite.config",
    "MigrationStripeError": "dualwrite.exceptions",
    "Outbox": "dualwrite.outbox",
    "OutboxDepth": "dualwrite.outbox",
    "OutboxWorker": "dualwrite.outbox",
    "PriceError": "dualwrite.exceptions",
    "RateLimitedError": "dualwrite.exceptions",
    "RecordOutcome": "dualwrite.models",
    "Recorder": "dualwrite.recorder",
    "RedisEvictionError": "dualwrite.exceptions",
    "RedisFlagStore": "dualwrite.flags",
    "RedisServerError": "dualwrite.exceptions",
    "Report": "dualwrite.report",
    "Resolution": "dualwrite.flags",
    "Settings": "dualwrite.config",
    "Stage": "dualwrite.models",
    "StagePlan": "dualwrite.models",
    "StageResolver": "dualwrite.flags",
    "StageSource": "dualwrite.engine",
    "StoreUnavailableError": "dualwrite.exceptions",
    "Stores": "dualwrite.stores",
    "StripeCallError": "dualwrite.exceptions",
    "StripeFailure": "dualwrite.models",
    "StripeReadError": "dualwrite.exceptions",
    "SyncRecorder": "dualwrite.recorder",
    "UnsendableHeaderError": "dualwrite.exceptions",
    "UsageEvent": "dualwrite.models",
    "UsageInputError": "dualwrite.exceptions",
    "UsageRoute": "dualwrite.config",
    "WriteResult": "dualwrite.models",
    "build_report": "dualwrite.report",
    "plan_for": "dualwrite.models",
    "render_table": "dualwrite.report",
}


def __getattr__(name: str) -> object:
    module_name = _EXPORTS.get(name)
    if module_name is not None:
        from importlib import import_module  # deferred: start-up cost

        value = getattr(import_module(module_name), name)
        globals()[name] = value  # later lookups skip this function
        return value
    # The version is read from the installed metadata only when asked for (stamina's pattern), so
    # that importing dualwrite does not pay for importlib.metadata.
    if name != "__version__":
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)

    from importlib.metadata import version

    return version("dualwrite")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
