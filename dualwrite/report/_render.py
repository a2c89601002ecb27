"""The report for people and for tools: a rich table for the terminal, and CSV."""

from __future__ import annotations

import csv
import heapq
import io
from typing import TextIO

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dualwrite.pricing import format_amount
from dualwrite.report._lines import (
    CUSTOMER,
    DRIFT,
    STATUS,
    VALUES,
    CustomerLines,
    RawLine,
    line_difference,
    line_model,
)
from dualwrite.report._models import CustomerDrift, CustomerMoney, CustomerReport, Report

__all__ = [
    "CSV_COLUMNS",
    "attention_rank",
    "render_csv",
    "render_table",
    "write_csv",
    "write_json",
]

_STATUS_STYLE = {
    "parity": "green",
    "pending": "yellow",
    "diverged": "bold red",
    "unverified": "yellow",
}
_STATUS_ORDER = {"diverged": 0, "pending": 1, "unverified": 2, "parity": 3}

CSV_COLUMNS = (
    "customer",
    "stage",
    "status",
    "events",
    "quantity",
    "legacy_expected_qty",
    "legacy_accepted_qty",
    "meter_expected_qty",
    "meter_accepted_qty",
    "difference",
    "difference_pct",
    "pending_qty",
    "legacy_failed_events",
    "meter_failed_events",
    "meter_late_refused_events",
    "legacy_refused_events",
    "meter_refused_events",
    "divergent_events",
    "translated_events",
    "delayed_events",
    "failures",
    "ready",
    "next_stage",
    "verdict",
    "periods",
    "event_names",
    "reconciled_at",
    "legacy_stripe_qty",
    "legacy_drift",
    "legacy_intended_drift",
    "meter_stripe_qty",
    "meter_drift",
    "meter_intended_drift",
    "money_currency",
    "legacy_amount",
    "meter_amount",
    "invoice_difference",
    "largest_invoice_difference",
)


def attention_rank(line: CustomerReport) -> tuple[int, bool, int, str]:
    """The order of customers that need a look first (the table's, and the report page's
    default): diverged, then pending; within each, drift from Stripe first, then the largest
    differences, then the customer id."""
    return _rank(line.status, line.drift, line.difference, line.customer)


def _rank(
    status: str, drift: CustomerDrift | None, difference: int, customer: str
) -> tuple[int, bool, int, str]:
    money = drift.money if drift is not None else None
    differs = money is not None and bool(money.differing or money.currency_differs)
    drifted = drift is not None and (drift.drifted or differs)
    return (_STATUS_ORDER[status], not drifted, -abs(difference), customer)


def _raw_rank(raw: RawLine) -> tuple[int, bool, int, str]:
    return _rank(raw[STATUS], raw[DRIFT], line_difference(raw[VALUES]), raw[CUSTOMER])


def _ranked(report: Report, limit: int | None) -> list[CustomerReport]:
    """Diverged first, then pending; within each, drift from Stripe first, then the largest
    differences (from the lines' plain values when the report was built here: only the lines
    shown get their models)."""
    lines = report.customers
    if isinstance(lines, CustomerLines):
        raw = lines.raw
        chosen = (
            sorted(raw, key=_raw_rank)
            if limit is None
            else heapq.nsmallest(limit, raw, key=_raw_rank)
        )
        return [line_model(line) for line in chosen]
    if limit is None:
        return sorted(lines, key=attention_rank)
    return heapq.nsmallest(limit, lines, key=attention_rank)


def _statuses(report: Report) -> list[str]:
    lines = report.customers
    if isinstance(lines, CustomerLines):
        return [raw[STATUS] for raw in lines.raw]
    return [line.status for line in lines]


def _drift_cell(line: CustomerReport) -> Text:
    drift = line.drift
    if drift is None:
        return Text("")
    cells = []
    for name, leg in (("legacy", drift.legacy), ("meter", drift.meter)):
        if leg.drift is not None:
            cells.append(f"{name} {leg.drift:+,}" if leg.drift else f"{name} 0")
    return Text(", ".join(cells) or "not compared", style="bold red" if drift.drifted else "")


def _money_cell(line: CustomerReport) -> Text:
    money = line.drift.money if line.drift is not None else None
    if money is None:
        return Text("")
    if money.currency_differs:
        return Text("other currency", style="bold red")
    if not money.priced or money.currency is None or money.difference is None:
        return Text(", ".join(money.skipped) or "not priced", style="dim")
    text = format_amount(money.difference, money.currency, signed=bool(money.difference))
    return Text(text, style="bold red" if money.differing else "green")


def render_table(report: Report, *, limit: int | None = 50) -> Group:
    """The report as rich renderables: the customer table (the ``limit`` lines that most need a
    look: diverged, pending, largest differences), then the latest divergent events."""
    table = Table(title="dualwrite: usage per customer, legacy vs meter", title_justify="left")
    for column, justify in (
        ("customer", "left"),
        ("stage", "left"),
        ("events", "right"),
        ("legacy", "right"),
        ("meter", "right"),
        ("difference", "right"),
        ("pending", "right"),
        ("failures", "left"),
        ("status", "left"),
        ("next stage", "left"),
        ("Stripe drift", "left"),
        ("invoice difference", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    shown = _ranked(report, limit)
    for line in shown:
        pending = line.legacy.pending_qty + line.meter.pending_qty
        difference = f"{line.difference:+,}" if line.difference else "0"
        if line.difference and line.difference_pct is not None:
            difference += f" ({line.difference_pct:+.2f} %)"
        verdict = line.verdict
        next_cell = Text("")
        if verdict.next_stage is not None:
            next_cell = Text(
                f"{verdict.next_stage.value}: {'ready' if verdict.ready else 'not yet'}",
                style="green" if verdict.ready else "yellow",
            )
        table.add_row(
            line.customer,
            line.stage.value,
            f"{line.events:,}",
            f"{line.legacy.accepted_qty:,}",
            f"{line.meter.accepted_qty:,}",
            difference,
            f"{pending:,}" if pending else "",
            ", ".join(f"{code} {count}" for code, count in line.failures.items()),
            Text(line.status, style=_STATUS_STYLE[line.status]),
            next_cell,
            _drift_cell(line),
            _money_cell(line),
        )
    parts: list[Table | Text] = [
        Text(f"WARNING: {warning}", style="bold red") for warning in report.redis_warnings
    ]
    parts.append(table)
    counts = {status: 0 for status in _STATUS_ORDER}
    for status in _statuses(report):
        counts[status] += 1
    summary = f"{len(report.customers):,} customers: " + ", ".join(
        f"{count:,} {status}" for status, count in counts.items()
    )
    if len(shown) < len(report.customers):
        summary += f" (showing {len(shown):,}; --json or --csv for all)"
    parts.append(Text(summary))
    if report.readiness_rule:
        parts.append(Text(f"readiness rule: {report.readiness_rule}", style="dim"))
    if report.outbox is not None:
        depth = report.outbox
        parts.append(
            Text(
                f"outbox: {depth.ready} queued, {depth.scheduled} waiting to retry, "
                f"{depth.dead} dead letters"
            )
        )
    if report.backpressure:
        waits = ", ".join(f"{name} {count:,}" for name, count in report.backpressure.items())
        parts.append(Text(f"rate limits (all processes): {waits}"))
    if report.unmapped.requests:
        unmapped = report.unmapped
        parts.append(
            Text(
                f"unmapped: {unmapped.requests:,} usage requests for {unmapped.items:,} subscription "
                "items were forwarded to legacy only (no [[meters]] mapping): "
                + ", ".join(f"{item} ({count:,})" for item, count in unmapped.top.items()),
                style="yellow",
            )
        )
    if report.divergences:
        log = Table(title="latest divergent events", title_justify="left")
        for column in ("customer", "kind", "identifier", "quantity", "legacy", "meter", "note"):
            log.add_column(column)
        for record in report.divergences:
            log.add_row(
                record.customer,
                record.kind,
                record.identifier,
                str(record.quantity),
                _leg_cell(record.legacy.status, record.legacy.stripe_id, record.legacy.error),
                _leg_cell(record.meter.status, record.meter.stripe_id, record.meter.error),
                record.note,
            )
        parts.append(log)
    return Group(*parts)


def _leg_cell(status: str, stripe_id: str | None, error: str | None) -> str:
    detail = stripe_id or error or ""
    return f"{status} {detail}".strip()


def _number(value: float | None) -> str:
    return "" if value is None else str(value)


def _drift_columns(drift: CustomerDrift | None) -> tuple[str, ...]:
    if drift is None:
        return ("",) * 7
    legacy, meter = drift.legacy, drift.meter
    return (
        f"{drift.checked_at:.3f}",
        _number(legacy.stripe_qty),
        _number(legacy.drift),
        _number(legacy.intended_drift),
        _number(meter.stripe_qty),
        _number(meter.drift),
        _number(meter.intended_drift),
    )


def _money_columns(money: CustomerMoney | None) -> tuple[str, ...]:
    if money is None:
        return ("",) * 5
    return (
        money.currency or "",
        _number(money.legacy_amount),
        _number(money.meter_amount),
        _number(money.difference),
        _number(money.largest_difference),
    )


def render_csv(report: Report) -> str:
    """One line per customer, with ``CSV_COLUMNS`` (failures as ``code=count;…``; the seven
    columns from ``reconciled_at`` on are empty for a customer never reconciled in the range, the
    last five, the money in the currency's smallest unit, for one never reconciled with
    ``--money``). ``write_csv`` writes the same to a file, line by line."""
    out = io.StringIO()
    write_csv(report, out)
    return out.getvalue()


def write_csv(report: Report, out: TextIO) -> None:
    """``render_csv``'s text written to ``out`` a line at a time (a million customers' CSV is
    never one string)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for line in report.customers:
        verdict = line.verdict
        writer.writerow(
            (
                line.customer,
                line.stage.value,
                line.status,
                line.events,
                line.quantity,
                line.legacy.expected_qty,
                line.legacy.accepted_qty,
                line.meter.expected_qty,
                line.meter.accepted_qty,
                line.difference,
                "" if line.difference_pct is None else line.difference_pct,
                line.legacy.pending_qty + line.meter.pending_qty,
                line.legacy.failed_events,
                line.meter.failed_events,
                line.meter.late_refused_events,
                line.legacy.refused_events,
                line.meter.refused_events,
                line.divergent_events,
                line.translated_events,
                line.delayed_events,
                ";".join(f"{code}={count}" for code, count in line.failures.items()),
                str(verdict.ready).lower(),
                "" if verdict.next_stage is None else verdict.next_stage.value,
                verdict.reason,
                " ".join(line.periods),
                " ".join(line.event_names),
                *_drift_columns(line.drift),
                *_money_columns(line.drift.money if line.drift is not None else None),
            )
        )


def write_json(report: Report, out: TextIO, *, indent: int | None = None) -> None:
    """``report.model_dump_json(indent=indent)`` written to ``out``, the same text, one customer's
    line at a time (a million customers' JSON is about a gigabyte: never one string here)."""
    empty = report.model_copy(update={"customers": []}).model_dump_json(indent=indent)
    marker = '"customers":[]' if indent is None else '"customers": []'
    before, after = empty.split(marker, 1)  # the first: the only unescaped one at that depth
    out.write(before)
    if not report.customers:
        out.write(marker)
    elif indent is None:
        out.write('"customers":[')
        for index, line in enumerate(report.customers):
            if index:
                out.write(",")
            out.write(line.model_dump_json())
        out.write("]")
    else:
        pad = "\n" + " " * (2 * indent)  # the lines sit two levels deep
        out.write('"customers": [')
        for index, line in enumerate(report.customers):
            if index:
                out.write(",")
            out.write(pad + line.model_dump_json(indent=indent).replace("\n", pad))
        out.write("\n" + " " * indent + "]")
    out.write(after)
