"""Reconciliation: Stripe's own totals for a period against the ledger, per customer, event name and
period.

Three figures per leg and period: what dualwrite intended (the ledger's ``<leg>_expected_qty``),
what it believes Stripe accepted (``<leg>_accepted_qty``), and what Stripe holds. Drift is Stripe's
figure minus the accepted one; it is stored per record (``P:{sN}:recon:…``, see ``_store``), kept
apart from the divergence log, and read back with ``read_reconciliation()`` (records) or, for a
report over many customers, ``read_reconciliation_fields()`` (the fields the report sums, from
per-period-span rollups written with each record).

Where Stripe's figures come from:

* **legacy**: the usage record summaries of the customer's subscription item(s) carrying the event
  name (``assign_items`` says which). A summary is the period's when its ``period.start`` and
  ``period.end`` equal the ledger period's start and end, to the second (one second of slack,
  should a bound be written as the last second it includes). Stripe calls ``start`` exclusive and
  ``end`` inclusive, but its bounds are the subscription's ``current_period_start``/``_end``, the
  same instants the ledger's ``[start, end)`` is cut at, and usage timestamped exactly at a period
  start belongs to that period; so the bounds are matched as numbers, not shifted. The newest
  summary (the first Stripe lists) is the open period and is never compared. A UTC-day ledger
  period has no summary (summaries are per billing period): skipped as ``day_period``.
* **meter**: the meter event summary of the customer on the meter of that event name, over the
  ledger period with both ends floored to the minute (``meter_window``): Stripe only summarises
  minute-aligned windows, and flooring keeps consecutive windows back to back.

A leg is compared only once its period ended at least ``settle_seconds`` ago (summaries lag). A
Stripe refusal is recorded on the leg (``stripe_error``) and the run goes on.

With ``money=True`` (``reconcile --money``) each record also carries a ``MoneyCheck``: what the
legacy price bills for the legacy leg's total and what the meter-backed price bills for the meter
leg's total, to the cent (``_money``, ``_pricer``; the price math is ``dualwrite.pricing``).
"""

from __future__ import annotations

from dualwrite.reconcile._matching import (
    BOUND_SLACK,
    assign_items,
    meter_window,
    summary_matches,
)
from dualwrite.reconcile._money import MoneyBasis, MoneyCheck, MoneySkip, price_legs
from dualwrite.reconcile._pricer import MoneyPricer
from dualwrite.reconcile._reconciler import (
    READ_MAX_WAIT,
    Progress,
    Reconciler,
    ReconciliationRun,
    read_throttle,
)
from dualwrite.reconcile._records import LegCheck, PeriodChoice, ReconciliationRecord, SkipReason
from dualwrite.reconcile._store import (
    ROLLUP_FIELDS,
    read_reconciliation,
    read_reconciliation_fields,
    save_records,
)

__all__ = [
    "BOUND_SLACK",
    "READ_MAX_WAIT",
    "ROLLUP_FIELDS",
    "LegCheck",
    "MoneyBasis",
    "MoneyCheck",
    "MoneyPricer",
    "MoneySkip",
    "PeriodChoice",
    "Progress",
    "Reconciler",
    "ReconciliationRecord",
    "ReconciliationRun",
    "SkipReason",
    "assign_items",
    "meter_window",
    "price_legs",
    "read_reconciliation",
    "read_reconciliation_fields",
    "read_throttle",
    "save_records",
    "summary_matches",
]
