"""The divergence report: per customer, what each leg holds against what it should hold.

``build_report()`` reads the ledger, the divergence log and the outbox into a ``Report`` (a pydantic
model, so ``--json`` is its JSON); ``render_table()`` draws it for a terminal with rich and
``render_csv()`` writes one line per customer. Each customer carries a readiness verdict for its next
stage, by the rule configured in ``[report]`` (printed with the report).

A customer's status:

* ``parity``: every leg holds exactly what it should (for ``shadow`` and ``primary`` customers that
  means equal totals on both legs);
* ``pending``: shadow writes are still in the outbox (waiting or retrying);
* ``diverged``: a shadow write was refused for good or expired, so the legs disagree; the divergence
  log says which events and why.

Usage the proxy forwarded without dual-writing it (its subscription item maps to no meter) belongs
to no customer line: ``Report.unmapped`` counts it, per item.
"""

from __future__ import annotations

from dualwrite.report._build import build_lines, build_report, read_backpressure, read_unmapped
from dualwrite.report._models import (
    CustomerDrift,
    CustomerMoney,
    CustomerReport,
    CustomerStatus,
    LegDrift,
    LegTotals,
    Report,
    UnmappedItems,
    Verdict,
    legacy_held,
)
from dualwrite.report._readiness import ReadinessRule
from dualwrite.report._render import (
    CSV_COLUMNS,
    attention_rank,
    render_csv,
    render_table,
    write_csv,
    write_json,
)

__all__ = [
    "CSV_COLUMNS",
    "CustomerDrift",
    "CustomerMoney",
    "CustomerReport",
    "CustomerStatus",
    "LegDrift",
    "LegTotals",
    "ReadinessRule",
    "Report",
    "UnmappedItems",
    "Verdict",
    "attention_rank",
    "build_lines",
    "build_report",
    "legacy_held",
    "read_backpressure",
    "read_unmapped",
    "render_csv",
    "render_table",
    "write_csv",
    "write_json",
]
