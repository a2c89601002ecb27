"""Reconciliation records: one per customer, meter event name and period (``_store`` keeps them in
Redis, one hash each). A record's fields, ``<leg>`` being ``legacy`` or ``meter``:

==============================  ===========================================================================
``customer`` ``event_name``     what the record is about
``period``
``checked_at``                  when the run read Stripe (Unix seconds)
``intended_qty``                usage recorded by dualwrite (the ledger's ``quantity``)
``<leg>_expected_qty``          what the leg should hold (ledger)
``<leg>_accepted_qty``          what dualwrite believes Stripe accepted on the leg (ledger)
``<leg>_stripe_qty``            what Stripe holds on the leg (empty: not compared)
``<leg>_drift``                 ``<leg>_stripe_qty - <leg>_accepted_qty`` (empty: not compared)
``<leg>_skipped``               why the leg was not compared (a ``SkipReason``; empty: compared)
``<leg>_detail``                the skip's or the comparison's details, for people
``items``                       the subscription items whose summaries make the legacy figure
``meter_id``                    the meter whose event summary makes the meter figure
``window_start`` ``window_end`` the meter summary's window (the period on minute boundaries)
``money_<field>``               the money check (``reconcile --money``; every field of ``MoneyCheck``,
                                empty when the run did not price the legs)
==============================  ===========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from dualwrite.periods import Period
from dualwrite.reconcile._money import MoneyCheck

__all__ = ["LegCheck", "PeriodChoice", "ReconciliationRecord", "SkipReason"]

SkipReason = Literal[
    "open_period",
    "not_settled",
    "day_period",
    "no_item",
    "no_summary",
    "no_meter",
    "not_comparable",
    "stripe_error",
]
"""Why a leg was not compared:

* ``open_period``: the period has not ended (or Stripe lists its summary as the open one);
* ``not_settled``: it ended less than ``settle_seconds`` ago (Stripe's summaries lag);
* ``day_period``: the ledger counts this period by UTC day, and legacy summaries are per billing
  period;
* ``no_item``: no subscription item of the customer is known to carry this event name's usage;
* ``no_summary``: no usage record summary of the item(s) covers this period;
* ``no_meter``: Stripe has no meter for this event name;
* ``not_comparable``: Stripe aggregates differently from the ledger's sum (``aggregate_usage`` other
  than ``sum``; a meter formula other than ``sum``; a pre-aggregated meter);
* ``stripe_error``: Stripe refused a read (or the network failed); the detail says how.
"""


class LegCheck(BaseModel):
    """One leg of a reconciliation: the ledger's figures, Stripe's, and the drift."""

    model_config = ConfigDict(frozen=True)

    expected_qty: int = 0
    accepted_qty: int = 0
    stripe_qty: int | float | None = None
    """What Stripe holds (None: not compared, see ``skipped``)."""
    drift: int | float | None = None
    """``stripe_qty - accepted_qty`` (None: not compared)."""
    skipped: SkipReason | None = None
    detail: str = ""

    @property
    def compared(self) -> bool:
        """Whether Stripe's figure was read and compared."""
        return self.skipped is None and self.stripe_qty is not None

    @property
    def drifted(self) -> bool:
        """Whether Stripe holds something other than what dualwrite believes it accepted."""
        return bool(self.drift)


class ReconciliationRecord(BaseModel):
    """The last reconciliation of one customer, meter event name and period."""

    model_config = ConfigDict(frozen=True)

    customer: str
    event_name: str
    period: str
    checked_at: float
    intended_qty: int = 0
    """What dualwrite recorded (the usage its callers were told was recorded)."""
    legacy: LegCheck = LegCheck()
    meter: LegCheck = LegCheck()
    items: list[str] = []
    """The subscription items whose usage record summaries make ``legacy.stripe_qty``."""
    meter_id: str | None = None
    window_start: int | None = None
    """The meter summary's window ``[window_start, window_end)``: the period on minute boundaries."""
    window_end: int | None = None
    money: MoneyCheck | None = None
    """What each leg's price bills (None: the run did not price the legs, see ``--money``)."""

    @property
    def drifted(self) -> bool:
        """Whether either leg drifted."""
        return self.legacy.drifted or self.meter.drifted

    def bills_differently(self, tolerance: int = 0) -> bool:
        """Whether the legs' prices bill more than ``tolerance`` apart (or in different
        currencies), or Stripe's preview billed otherwise than computed."""
        money = self.money
        return money is not None and (money.differs(tolerance) or money.preview_agrees is False)

    def to_fields(self) -> dict[str, str]:
        """The hash fields of this record (see the module docstring)."""
        fields = {
            "customer": self.customer,
            "event_name": self.event_name,
            "period": self.period,
            "checked_at": f"{self.checked_at:.3f}",
            "intended_qty": str(self.intended_qty),
            "items": ",".join(self.items),
            "meter_id": self.meter_id or "",
            "window_start": _text(self.window_start),
            "window_end": _text(self.window_end),
        }
        for name, leg in (("legacy", self.legacy), ("meter", self.meter)):
            fields |= {
                f"{name}_expected_qty": str(leg.expected_qty),
                f"{name}_accepted_qty": str(leg.accepted_qty),
                f"{name}_stripe_qty": _text(leg.stripe_qty),
                f"{name}_drift": _text(leg.drift),
                f"{name}_skipped": leg.skipped or "",
                f"{name}_detail": leg.detail,
            }
        money = self.money.model_dump() if self.money is not None else {}
        fields |= {f"money_{name}": _text(money.get(name)) for name in _MONEY_FIELDS}
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> ReconciliationRecord:
        """Parse a record hash."""

        def leg(name: str) -> LegCheck:
            return LegCheck.model_validate(
                {
                    "expected_qty": int(fields.get(f"{name}_expected_qty") or 0),
                    "accepted_qty": int(fields.get(f"{name}_accepted_qty") or 0),
                    "stripe_qty": _number(fields.get(f"{name}_stripe_qty")),
                    "drift": _number(fields.get(f"{name}_drift")),
                    "skipped": fields.get(f"{name}_skipped") or None,
                    "detail": fields.get(f"{name}_detail", ""),
                }
            )

        window_start, window_end = fields.get("window_start"), fields.get("window_end")
        money = {name: fields.get(f"money_{name}") or None for name in _MONEY_FIELDS}
        return cls(
            customer=fields.get("customer", ""),
            event_name=fields.get("event_name", ""),
            period=fields.get("period", ""),
            checked_at=float(fields.get("checked_at") or 0),
            intended_qty=int(fields.get("intended_qty") or 0),
            legacy=leg("legacy"),
            meter=leg("meter"),
            items=[item for item in fields.get("items", "").split(",") if item],
            meter_id=fields.get("meter_id") or None,
            window_start=int(window_start) if window_start else None,
            window_end=int(window_end) if window_end else None,
            money=_money(money),
        )


_MONEY_FIELDS = tuple(MoneyCheck.model_fields)
_MONEY_NUMBERS = {"legacy_qty", "meter_qty"}
_MONEY_INTS = {"legacy_amount", "meter_amount", "preview_legacy_amount", "preview_meter_amount"}


def _money(values: dict[str, str | None]) -> MoneyCheck | None:
    """A stored money check (None: the record was not priced; every field is empty)."""
    if not any(values.values()):
        return None
    parsed: dict[str, object] = {}
    for name, text in values.items():
        if name in _MONEY_NUMBERS:
            parsed[name] = _number(text)
        elif name in _MONEY_INTS:
            parsed[name] = int(text) if text else None
        elif name in ("detail", "preview_detail"):
            parsed[name] = text or ""
        else:
            parsed[name] = text
    return MoneyCheck.model_validate(parsed)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _number(text: str | None) -> int | float | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


@dataclass(frozen=True, slots=True)
class PeriodChoice:
    """What ``--period`` selects: a billing period exactly, or every period holding a UTC day."""

    text: str
    span: Period
    exact: bool
    """True for a billing period id: only that period. False for a date: every period (the UTC
    day itself, or a customer's billing period) that overlaps the day."""

    @classmethod
    def parse(cls, text: str) -> PeriodChoice:
        """Parse a billing period id (``20261101T000000Z/20261201T000000Z``) or a date
        (``2026-11-25``).

        Raises:
            ValueError: ``text`` is neither.
        """
        try:
            span = Period.parse(text.strip())
        except ValueError:
            msg = (
                f"{text!r} is not a period: give a billing period id such as "
                "20261101T000000Z/20261201T000000Z, or a date such as 2026-11-25"
            )
            raise ValueError(msg) from None
        if span.end <= span.start:
            msg = f"{text!r} is not a period: it ends before it starts"
            raise ValueError(msg)
        if span.start < 0:
            # Stripe has no usage before 1970, and a year below 1000 has no 4-digit id to read back.
            msg = f"{text!r} is not a period: it starts before 1970-01-01"
            raise ValueError(msg)
        return cls(text=span.id, span=span, exact=span.kind == "billing")

    @property
    def days(self) -> tuple[str, str]:
        """The first and last UTC day the choice touches (for ``Ledger.rows``)."""
        return _day(self.span.start), _day(self.span.end - 1)

    def matches(self, period: str) -> bool:
        """Whether ledger period ``period`` is selected."""
        if self.exact:
            return period == self.span.id
        other = Period.parse(period)
        return other.start < self.span.end and other.end > self.span.start


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")
