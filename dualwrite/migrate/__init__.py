"""Migration steps around the dual write: creating the meters (``meters plan|apply``) and replaying
usage already on the legacy path into them (``backfill``).

* ``build_plan`` / ``apply_plan``: a meter for every legacy metered price, and the ``[[meters]]``
  mapping written into the config file;
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
    apply_plan,
    build_plan,
    describe_call,
)
from dualwrite.migrate._stripe import MigrationStripe, MigrationStripeError

__all__ = [
    "FORMULAS",
    "METER_PAST_WINDOW",
    "ApplyResult",
    "BackfillEvent",
    "BackfillInputError",
    "BackfillResult",
    "ExportRow",
    "MeterPlan",
    "MigrationStripe",
    "MigrationStripeError",
    "OpsAudit",
    "OpsAuditEntry",
    "PlannedMeter",
    "apply_plan",
    "build_plan",
    "describe_call",
    "read_export",
    "run_backfill",
]
