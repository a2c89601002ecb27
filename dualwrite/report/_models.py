"""The report's values: per-leg totals, a customer's line, the readiness verdict, the whole report."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, field_serializer

from dualwrite.ledger import DivergenceRecord, LedgerRow
from dualwrite.models import Stage
from dualwrite.outbox import OutboxDepth

__all__ = [
    "CustomerDrift",
    "CustomerMoney",
    "CustomerReport",
    "CustomerStatus",
    "LegDrift",
    "LegTotals",
    "Report",
    "UnmappedItems",
    "Verdict",
    "legacy_held",
]

CustomerStatus = Literal["parity", "pending", "diverged", "unverified"]
"""``parity``: each leg holds what it should; ``pending``: shadow writes still queued or retrying,
or events claimed and not yet committed (in flight, or waiting for recovery after a crash or a
write Stripe never answered); ``diverged``: a write was refused for good, expired, or refused
late; ``unverified``: the legs look equal but Redis lost data (``Report.ledger_incomplete_since``),
so the ledger cannot vouch for it."""


_Model = TypeVar("_Model", bound=BaseModel)


def legacy_held(accepted_qty: int, retired_qty: int) -> int:
    """What the legacy leg accounts for when compared with the meter: what Stripe accepted, plus
    the retired writes (refused only because the item moved to its meter-backed price, so the meter
    leg bills them: explained, never a difference)."""
    return accepted_qty + retired_qty


_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


def trusted(cls: type[_Model], values: dict[str, Any]) -> _Model:
    """A model from values that already have its fields' types, as ``model_construct`` makes it
    but without its per-field Python loop: ``values`` must hold every field, and nothing else.

    For the report's hot loop only: validation was a third of a 100,000-customer report, and the
    values are ints and objects the report computed itself (tests/report/test_report.py checks the lines
    against validated copies).

    Every model of a class shares one fields-set (all its fields: nothing can add to it, and
    ``model_copy`` copies it before adding): a set per model was half of a large report's memory.
    """
    model = cls.__new__(cls)
    object.__setattr__(model, "__dict__", values)
    fields = _ALL_FIELDS.get(cls)
    if fields is None:
        fields = _ALL_FIELDS[cls] = set(cls.model_fields)
    object.__setattr__(model, "__pydantic_fields_set__", fields)
    object.__setattr__(model, "__pydantic_extra__", None)
    object.__setattr__(model, "__pydantic_private__", None)
    return model


class LegTotals(BaseModel):
    """One leg's totals for a customer."""

    model_config = ConfigDict(frozen=True)

    expected_events: int = 0
    expected_qty: int = 0
    accepted_events: int = 0
    accepted_qty: int = 0
    failed_events: int = 0
    failed_qty: int = 0
    retired_events: int = 0
    retired_qty: int = 0
    late_refused_events: int = 0
    late_refused_qty: int = 0
    """Meter events Stripe accepted, then refused in an error report."""
    refused_events: int = 0
    """Authoritative refusals returned to callers (not divergence)."""
    backfilled_events: int = 0
    backfilled_qty: int = 0
    """Meter events ``dualwrite backfill`` replayed from legacy usage (part of accepted)."""

    @property
    def pending_qty(self) -> int:
        """Quantity expected on this leg and not settled yet."""
        settled = self.accepted_qty + self.failed_qty + self.retired_qty + self.late_refused_qty
        return self.expected_qty - settled

    @property
    def pending_events(self) -> int:
        """Events expected on this leg and not settled yet."""
        settled = (
            self.accepted_events
            + self.failed_events
            + self.retired_events
            + self.late_refused_events
        )
        return self.expected_events - settled

    @classmethod
    def from_rows(cls, leg: str, rows: Iterable[LedgerRow]) -> LegTotals:
        """Sum one leg's counters over ledger rows."""
        names = _LEG_FIELDS[leg]
        sums = [0] * len(names)
        for row in rows:
            counters = row.counters
            for index, (_, counter) in enumerate(names):
                sums[index] += counters.get(counter, 0)
        values: dict[str, Any] = {
            field: total for (field, _), total in zip(names, sums, strict=True)
        }
        return cls(**values)  # pydantic-core validates ints faster than model_construct copies


_LEG_FIELDS = {
    leg: [(name, f"{leg}_{name}") for name in LegTotals.model_fields] for leg in ("legacy", "meter")
}


class Verdict(BaseModel):
    """Whether a customer is ready for its next stage, and why, by the configured rule."""

    model_config = ConfigDict(frozen=True)

    ready: bool
    next_stage: Stage | None
    """The stage it would move to (None: already at ``meter``)."""
    reason: str


class LegDrift(BaseModel):
    """One leg of a customer's last reconciliation with Stripe, summed over the periods and meter
    event names where the leg was compared."""

    model_config = ConfigDict(frozen=True)

    compared: int = 0
    """Periods (times meter event names) whose Stripe total was read and compared."""
    stripe_qty: int | float | None = None
    """What Stripe holds (None: never compared)."""
    expected_qty: int = 0
    """What dualwrite intended the leg to hold, over the compared periods."""
    accepted_qty: int = 0
    """What dualwrite believes Stripe accepted, over the compared periods."""
    drift: int | float | None = None
    """``stripe_qty - accepted_qty``: what Stripe holds that dualwrite did not see accepted."""
    intended_drift: int | float | None = None
    """``stripe_qty - expected_qty``: the gap to what was intended (pending and failed writes
    included)."""
    skipped: dict[str, int] = Field(default_factory=dict)
    """Periods not compared, by reason (``open_period``, ``not_settled``, ``no_item``…)."""


class CustomerMoney(BaseModel):
    """What each leg's price bills, summed over the customer's periods reconciled with
    ``dualwrite reconcile --money`` (amounts in the currency's smallest unit, cents for USD)."""

    model_config = ConfigDict(frozen=True)

    priced: int = 0
    """Periods (times meter event names) whose legs were priced."""
    currency: str | None = None
    """Their currency (``mixed`` when they bill in several: no sums then)."""
    legacy_amount: int | None = None
    """What the legacy price bills for the legacy leg's totals."""
    meter_amount: int | None = None
    """What the meter-backed price bills for the meter leg's totals."""
    difference: int | None = None
    """``meter_amount - legacy_amount``: what the invoices would change by on the meter path."""
    largest_difference: int | None = None
    """The difference of the period that differs most (periods are invoiced one by one, so a
    period billing more does not make up for one billing less)."""
    differing: int = 0
    """Priced periods whose invoices differ by at least one unit."""
    currency_differs: int = 0
    """Periods whose two prices bill in different currencies."""
    preview_disagrees: int = 0
    """Periods whose Stripe invoice preview billed otherwise than computed (``--preview``)."""
    skipped: dict[str, int] = Field(default_factory=dict)
    """Periods not priced, by reason (``no_meter_price``, ``not_comparable``…)."""

    def blocks(self, tolerance: int) -> bool:
        """Whether these invoices keep the customer off the meter path (beyond ``tolerance``)."""
        largest = abs(self.largest_difference or 0)
        return bool(self.currency_differs or self.preview_disagrees or largest > tolerance)


class CustomerDrift(BaseModel):
    """A customer's reconciliation with Stripe (``dualwrite reconcile``) in the report's range."""

    model_config = ConfigDict(frozen=True)

    checked_at: float
    """When the latest of its reconciliations read Stripe (Unix seconds)."""
    records: int
    """Reconciled periods (times meter event names)."""
    legacy: LegDrift
    meter: LegDrift
    money: CustomerMoney | None = None
    """What each leg's price bills (None: never reconciled with ``--money`` in the range)."""

    @property
    def drifted(self) -> bool:
        """Whether Stripe holds, on either leg, other than what dualwrite believes it accepted."""
        return bool(self.legacy.drift) or bool(self.meter.drift)


class CustomerReport(BaseModel):
    """One customer's line in the report."""

    model_config = ConfigDict(frozen=True)

    customer: str
    stage: Stage
    event_names: list[str]
    periods: list[str]
    events: int
    quantity: int
    legacy: LegTotals
    meter: LegTotals
    translated_events: int
    divergent_events: int
    delayed_events: int = 0
    """Events whose record waited in a local spool while Redis was down."""
    unfinished_events: int = 0
    """Events claimed and not yet committed: in flight now, or waiting for recovery (their
    holder died, or Stripe never answered their authoritative write). No leg shows them yet."""
    status: CustomerStatus
    difference_pct: float | None = None
    """The difference as a percentage of the larger leg (None when a leg is not written)."""
    failures: dict[str, int] = Field(default_factory=dict)
    """Failures by leg and Stripe code: ``legacy:card_declined`` (refused to the caller),
    ``meter:shadow:parameter_invalid`` (a shadow write dead-lettered) and so on."""
    recent_divergences: list[DivergenceRecord] = Field(default_factory=list)
    """The customer's latest divergent events (a few), with both legs' Stripe ids and errors."""
    verdict: Verdict
    drift: CustomerDrift | None = None
    """The last reconciliation with Stripe's own totals (None: never reconciled in the range)."""

    @property
    def difference(self) -> int:
        """Legacy total minus meter total (accepted quantities; retired legacy writes count on the
        legacy side, see ``legacy_held``)."""
        return (
            legacy_held(self.legacy.accepted_qty, self.legacy.retired_qty) - self.meter.accepted_qty
        )


class UnmappedItems(BaseModel):
    """Usage the proxy forwarded to the legacy path only, because its item maps to no meter."""

    model_config = ConfigDict(frozen=True)

    items: int = 0
    """Distinct subscription items."""
    requests: int = 0
    """Usage-record requests forwarded for them."""
    top: dict[str, int] = Field(default_factory=dict)
    """The items with the most requests (at most ten)."""


class Report(BaseModel):
    """The whole report."""

    model_config = ConfigDict(frozen=True)

    generated_at: float
    since: str | None
    until: str | None
    customers: Sequence[CustomerReport]
    """One line per customer: a list once validated (from JSON), and as ``build_report`` returns
    it a ``CustomerLines``, which keeps each line as plain values and makes its models when it is
    read (a million customers' models would not fit in 2 GiB)."""
    divergences: list[DivergenceRecord]
    outbox: OutboxDepth | None
    unmapped: UnmappedItems = Field(default_factory=UnmappedItems)
    """Usage the proxy forwarded without dual-writing it (all customers, all periods)."""
    backpressure: dict[str, int] = Field(default_factory=dict)
    """Rate-limit waits and writes held back (then retried), per limit: ``<limit>_waits``,
    ``<limit>_waited_ms``, ``<limit>_held_back``."""
    readiness_rule: str = ""
    """The rule the verdicts follow, in words."""
    redis_persistence: Literal["aof", "rdb", "none", "unknown"] | None = None
    """What survives a Redis restart (``dualwrite.durability``): an append-only file, RDB
    snapshots only, nothing, or unknown (``CONFIG`` refused); None when not read."""
    ledger_incomplete_since: float | None = None
    """When Redis lost data (Unix seconds), as its data-loss markers record: the ledger may miss
    usage from then on, so no customer is at ``parity`` (``unverified`` instead) and none is ready,
    until ``dualwrite reconcile`` and ``dualwrite durability --clear-loss``."""

    @field_serializer("customers")
    def _customers(self, lines: Sequence[CustomerReport], info: SerializationInfo) -> Any:
        # To JSON one line at a time (never all the lines' models at once); a list otherwise.
        # Typed ``Any``: each line then goes through its own model's serializer, where a
        # ``list | Iterable`` return type made pydantic try both per line, five times slower.
        return iter(lines) if info.mode_is_json() else list(lines)

    @property
    def redis_warnings(self) -> list[str]:
        """What the report must say first about Redis: a data loss, no persistence."""
        found = []
        if self.ledger_incomplete_since is not None:
            since = time.strftime(
                "%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.ledger_incomplete_since)
            )
            found.append(
                f"ledger incomplete since {since} (Redis data lost): no customer is shown at "
                "parity. Run `dualwrite reconcile` for the periods since then, then "
                "`dualwrite durability --clear-loss`"
            )
        if self.redis_persistence == "none":
            found.append(
                "Redis has no persistence: a restart loses the outbox, the ledger and every "
                "stage (set appendonly yes, appendfsync everysec)"
            )
        elif self.redis_persistence == "rdb":
            found.append(
                "Redis keeps RDB snapshots only: a restart loses what was written since the last "
                "snapshot (set appendonly yes, appendfsync everysec)"
            )
        return found

    @property
    def divergent_customers(self) -> int:
        """Customers with at least one divergent event."""
        return sum(1 for customer in self.customers if customer.status == "diverged")
