"""Migration steps around the dual write: creating the meters (``meters plan|apply``) and replaying
usage already on the legacy path into them (``backfill``).

* ``build_plan`` / ``apply_plan``: a meter for every legacy metered price, the meter-backed price
  that bills the same, and the ``[[meters]]`` mapping written into the config file;
* ``run_backfill``: a customer's legacy usage (usage record summaries, or an export file) as meter
  events, each counted once in the ledger as backfilled;
* ``OpsAudit``: the operations audit stream both write to.
"""

from __future__ import annotations

from dualwrite.migrate._audit import OpsAudit, OpsAuditEntry
from dualwrite.migrate._backfill import (
    METER_PAST_WINDOW,
    BackfillEvent,
    BackfillResult,
    run_backfill,
)
from dualwrite.migrate._export import BackfillInputError, ExportRow, read_export
from dualwrite.migrate._meters import (
    FORMULAS,
    ApplyResult,
    MeterPlan,
    PlannedMeter,
    PlannedPrice,
    apply_plan,
    build_plan,
    describe_call,
)
from dualwrite.migrate._prices import plan_price
from dualwrite.migrate._stripe import LegacyPrice, MeterPrice, MigrationStripe, MigrationStripeError

__all__ = [
    "FORMULAS",
    "METER_PAST_WINDOW",
    "ApplyResult",
    "BackfillEvent",
    "BackfillInputError",
    "BackfillResult",
    "ExportRow",
    "LegacyPrice",
    "MeterPlan",
    "MeterPrice",
    "MigrationStripe",
    "MigrationStripeError",
    "OpsAudit",
    "OpsAuditEntry",
    "PlannedMeter",
    "PlannedPrice",
    "apply_plan",
    "build_plan",
    "describe_call",
    "plan_price",
    "read_export",
    "run_backfill",
]
