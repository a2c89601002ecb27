"""What the pages show, computed from the report models: filters read from the query string, the
overview's summary, sorting and paging of the customer table, per-period lines of a customer."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args
from urllib.parse import urlencode

from dualwrite.exceptions import BadQueryError
from dualwrite.ledger import LedgerRow
from dualwrite.models import Stage
from dualwrite.report import CustomerReport, LegTotals, Report, attention_rank, legacy_held

__all__ = [
    "PAGE_SIZE",
    "BadQueryError",
    "Filters",
    "LegSums",
    "PeriodLine",
    "SortOrder",
    "Summary",
    "parse_count",
    "period_lines",
    "sort_customers",
    "summarise",
]

PAGE_SIZE = 200
MAX_CUSTOMER_LENGTH = 255
SortOrder = Literal["attention", "customer", "difference"]
"""``attention``: the customers that need a look first, in the CLI table's order (the default)."""
_SORTS: tuple[SortOrder, ...] = get_args(SortOrder)
_DAY_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_COUNT_RE = re.compile(r"^[0-9]{1,9}$")
_TRUE = {"1", "on", "true", "yes"}


def parse_count(text: str, *, name: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` written in ASCII digits.

    Raises:
        BadQueryError: anything else.
    """
    if not _COUNT_RE.fullmatch(text) or not low <= int(text) <= high:
        msg = f"{name}: a whole number from {low} to {high}"
        raise BadQueryError(msg)
    return int(text)


@dataclass(frozen=True, slots=True)
class Filters:
    """The overview's filter form, as read from the query string."""

    customer: str | None = None
    stage: Stage | None = None
    divergent: bool = False
    since: str | None = None
    until: str | None = None
    sort: SortOrder = "attention"
    page: int = 1

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> Filters:
        """Read the form; empty fields mean "any".

        Raises:
            BadQueryError: a field holds a value outside what it accepts.
        """
        customer = query.get("customer", "").strip() or None
        if customer is not None and len(customer) > MAX_CUSTOMER_LENGTH:
            msg = f"customer: at most {MAX_CUSTOMER_LENGTH} characters"
            raise BadQueryError(msg)
        stage_text = query.get("stage", "")
        if stage_text and stage_text not in {stage.value for stage in Stage}:
            msg = f"stage: one of {', '.join(stage.value for stage in Stage)}"
            raise BadQueryError(msg)
        days = {}
        for name in ("since", "until"):
            value = query.get(name, "").strip()
            if value and not _DAY_RE.fullmatch(value):
                msg = f"{name}: write a day as YYYY-MM-DD"
                raise BadQueryError(msg)
            days[name] = value or None
        sort = query.get("sort", "") or "attention"
        sort = "attention" if sort == "status" else sort  # the name of links made before 0.2
        if sort not in _SORTS:
            msg = f"sort: one of {', '.join(_SORTS)}"
            raise BadQueryError(msg)
        page_text = query.get("page", "") or "1"
        if not _COUNT_RE.fullmatch(page_text) or int(page_text) < 1:
            msg = "page: a whole number from 1"
            raise BadQueryError(msg)
        return cls(
            customer=customer,
            stage=Stage(stage_text) if stage_text else None,
            divergent=query.get("divergent", "").lower() in _TRUE,
            since=days["since"],
            until=days["until"],
            sort=sort,  # checked against _SORTS above
            page=int(page_text),
        )

    @property
    def active(self) -> bool:
        """Whether anything narrows the customers shown."""
        return bool(self.customer or self.stage or self.divergent or self.since or self.until)

    def query(self, *, page: int) -> str:
        """The query string of these filters on another page (for paging links)."""
        changed = replace(self, page=page)
        pairs = [
            ("customer", changed.customer or ""),
            ("stage", changed.stage.value if changed.stage else ""),
            ("divergent", "1" if changed.divergent else ""),
            ("since", changed.since or ""),
            ("until", changed.until or ""),
            ("sort", "" if changed.sort == "attention" else changed.sort),
            ("page", "" if changed.page == 1 else str(changed.page)),
        ]
        return urlencode([(name, value) for name, value in pairs if value])


@dataclass(frozen=True, slots=True)
class LegSums:
    """One leg's totals over many customers (or one customer's period)."""

    expected_qty: int = 0
    accepted_qty: int = 0
    pending_qty: int = 0
    failed_events: int = 0
    failed_qty: int = 0
    retired_qty: int = 0
    late_refused_qty: int = 0
    refused_events: int = 0

    @classmethod
    def of(cls, legs: Sequence[LegTotals]) -> LegSums:
        """Add up ``legs``."""
        return cls(
            expected_qty=sum(leg.expected_qty for leg in legs),
            accepted_qty=sum(leg.accepted_qty for leg in legs),
            pending_qty=sum(leg.pending_qty for leg in legs),
            failed_events=sum(leg.failed_events for leg in legs),
            failed_qty=sum(leg.failed_qty for leg in legs),
            retired_qty=sum(leg.retired_qty for leg in legs),
            late_refused_qty=sum(leg.late_refused_qty for leg in legs),
            refused_events=sum(leg.refused_events for leg in legs),
        )


@dataclass(frozen=True, slots=True)
class Summary:
    """The overview's headline numbers, over the customers the filters keep."""

    customers: int
    by_stage: dict[str, int]
    by_status: dict[str, int]
    events: int
    quantity: int
    legacy: LegSums
    meter: LegSums
    divergent_events: int
    ready: int
    """Customers whose verdict says they are ready for their next stage."""

    @property
    def difference(self) -> int:
        """Legacy accepted (retired writes included: ``legacy_held``) minus meter accepted."""
        return (
            legacy_held(self.legacy.accepted_qty, self.legacy.retired_qty) - self.meter.accepted_qty
        )


def summarise(report: Report) -> Summary:
    """Count customers per stage and status, and add up both legs."""
    customers = report.customers
    by_stage = dict.fromkeys((stage.value for stage in Stage), 0)
    by_status = dict.fromkeys(("parity", "pending", "diverged", "unverified"), 0)
    for customer in customers:
        by_stage[customer.stage.value] = by_stage.get(customer.stage.value, 0) + 1
        by_status[customer.status] = by_status.get(customer.status, 0) + 1
    return Summary(
        customers=len(customers),
        by_stage=by_stage,
        by_status=by_status,
        events=sum(customer.events for customer in customers),
        quantity=sum(customer.quantity for customer in customers),
        legacy=LegSums.of([customer.legacy for customer in customers]),
        meter=LegSums.of([customer.meter for customer in customers]),
        divergent_events=sum(customer.divergent_events for customer in customers),
        ready=sum(1 for customer in customers if customer.verdict.ready),
    )


def sort_customers(customers: Sequence[CustomerReport], order: SortOrder) -> list[CustomerReport]:
    """Those needing a look first (the CLI table's order), customer id order (the report's), or
    largest difference first."""
    if order == "attention":
        return sorted(customers, key=attention_rank)
    if order == "difference":
        return sorted(customers, key=lambda c: (-abs(c.difference), c.customer))
    return list(customers)


@dataclass(frozen=True, slots=True)
class PeriodLine:
    """One ledger row of a customer: a period and meter event name, with both legs' totals."""

    period: str
    event_name: str
    events: int
    quantity: int
    legacy: LegTotals
    meter: LegTotals
    translated_events: int
    divergent_events: int

    @property
    def difference(self) -> int:
        """Legacy accepted (retired writes included: ``legacy_held``) minus meter accepted."""
        return (
            legacy_held(self.legacy.accepted_qty, self.legacy.retired_qty) - self.meter.accepted_qty
        )

    @property
    def pending_qty(self) -> int:
        """Quantity not settled yet on either leg."""
        return self.legacy.pending_qty + self.meter.pending_qty


def period_lines(rows: Sequence[LedgerRow]) -> list[PeriodLine]:
    """A customer's ledger rows as lines, newest period first (then by event name)."""
    lines = [
        PeriodLine(
            period=row.period,
            event_name=row.event_name,
            events=row["events"],
            quantity=row["quantity"],
            legacy=LegTotals.from_rows("legacy", [row]),
            meter=LegTotals.from_rows("meter", [row]),
            translated_events=row["translated_events"],
            divergent_events=row["divergent_events"],
        )
        for row in rows
    ]
    lines.sort(key=lambda line: line.event_name)
    lines.sort(key=lambda line: _period_start(line.period), reverse=True)
    return lines


def _period_start(period: str) -> str:
    # ``2026-11-25`` (a UTC day) and ``20261101T000000Z/...`` (a billing period) sort by first day.
    return re.sub(r"\D", "", period)[:8]
