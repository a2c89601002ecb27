"""The ledger (per customer, meter event name and UTC day: what each leg was meant to hold and what
it holds) and the divergence log (every event whose two legs disagree).

Updates are built as plain values (``LedgerUpdate``) and applied by whoever owns the atomic step:
the engine's commit (``CommitWriter``) applies them in the script that resolves the event's claim
and enqueues the shadow write, the outbox worker in the script that acknowledges the entry. Every
such script is composed from one Lua fragment and takes the same leading keys and arguments
(``_update``: ``ledger_script``, ``ledger_block``), so a ledger change never happens without the
state change it describes, never twice, and always with the row's copy in its rollup refreshed
(``_rollups``), which is what reports over many customers read.

Modules: ``_update`` (the update, the fragment, its arguments), ``_commit`` (an accepted event's
commit), ``_rollups`` (the packed row copies), ``_divergence`` (the divergence log's entries),
``_reader`` (``Ledger``, reading rows and divergences back).

Counter fields of one ledger hash (``<leg>`` is ``legacy`` or ``meter``):

==============================  ===========================================================================
``events`` / ``quantity``       usage recorded: the authoritative write succeeded (the caller was told so)
``<leg>_expected_*``            what the leg should hold: the authoritative leg, plus the shadow once enqueued
``<leg>_accepted_*``            what Stripe accepted on the leg
``<leg>_failed_*``              shadow writes refused for good or expired (dead letters): divergence
``<leg>_retired_*``             legacy shadow writes refused because the item left the legacy system
``meter_late_refused_*``        meter events Stripe accepted, then refused in an error report (divergence)
``<leg>_refused_events``        authoritative refusals handed back to callers (not divergence)
``translated_events``           legacy ``set`` events sent to the meter as a difference
``delayed_events``              events whose commit waited in the local spool while Redis was down
``meter_backfilled_*``          meter events ``dualwrite backfill`` replayed from legacy usage (also in
                                ``meter_expected_*`` and ``meter_accepted_*``)
``divergent_events``            events written to the divergence log
``<leg>_failed_code:<code>``    shadow failures per Stripe error code (``expired``: too old)
``<leg>_refused_code:<code>``   authoritative refusals per Stripe error code
``stage_<stage>_events``        events recorded while the customer was at that stage
==============================  ===========================================================================

Quantities are *effective*: what the event adds to the period's total. For ``increment`` that is the
quantity; for a translated ``set`` it is the difference from the value set before at that timestamp,
which is also what Stripe's legacy total moves by.
"""

from __future__ import annotations

from dualwrite.ledger._commit import IN_DOUBT_MARKER_TTL, SPOOL_MARKER_TTL, Commit, CommitWriter
from dualwrite.ledger._divergence import (
    DivergenceKind,
    DivergenceRecord,
    LegView,
    describe_failure,
    divergence_fields,
)
from dualwrite.ledger._reader import Ledger, LedgerRow
from dualwrite.ledger._rollups import (
    PACKED_FIELDS,
    PACKED_VERSION,
    ROLLUP_LUA,
    RolledRow,
    backfill,
    collector_paused,
    list_customer_rows,
    parse_counters,
    read_customer_rows,
    read_packed,
    read_rollups,
    rollup_key,
)
from dualwrite.ledger._update import (
    COUNTER_FIELDS,
    LEDGER_KEYS,
    LedgerUpdate,
    failure_code,
    ledger_block,
    ledger_script,
    period_score,
    safe_code,
)

__all__ = [
    "COUNTER_FIELDS",
    "IN_DOUBT_MARKER_TTL",
    "LEDGER_KEYS",
    "PACKED_FIELDS",
    "PACKED_VERSION",
    "ROLLUP_LUA",
    "SPOOL_MARKER_TTL",
    "Commit",
    "CommitWriter",
    "DivergenceKind",
    "DivergenceRecord",
    "Ledger",
    "LedgerRow",
    "LedgerUpdate",
    "LegView",
    "RolledRow",
    "backfill",
    "collector_paused",
    "describe_failure",
    "divergence_fields",
    "failure_code",
    "ledger_block",
    "ledger_script",
    "list_customer_rows",
    "parse_counters",
    "period_score",
    "read_customer_rows",
    "read_packed",
    "read_rollups",
    "rollup_key",
    "safe_code",
]
