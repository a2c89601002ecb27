"""The readiness verdict: is a customer ready for its next stage? The rule is configurable
(``[report]``) and printed with every report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dualwrite.config import ReportSettings
from dualwrite.ledger import LedgerRow
from dualwrite.models import Stage
from dualwrite.periods import period_of
from dualwrite.pricing import format_amount
from dualwrite.report._lines import AT, counters_of
from dualwrite.report._models import CustomerDrift, Verdict

__all__ = ["ReadinessRule"]

_NEXT = {Stage.LEGACY: Stage.SHADOW, Stage.SHADOW: Stage.PRIMARY, Stage.PRIMARY: Stage.METER}


class ReadinessRule:
    """Judges customers by the settings' rule, as of ``now``."""

    def __init__(self, settings: ReportSettings, *, now: float):
        self.periods = settings.readiness_closed_periods
        self.max_difference_pct = settings.readiness_max_difference_pct
        self.max_money_difference = settings.readiness_max_money_difference
        self.now = now
        self._closed: dict[str, bool] = {}
        """Whether each period seen so far is closed (a report judges 100,000 customers)."""
        self._verdicts: dict[tuple[Stage, int, int, bool], Verdict] = {}

    def describe(self) -> str:
        """The rule in words."""
        return (
            f"legacy is always ready for shadow (meter events go to an unbilled meter); shadow and "
            f"primary are ready for the next stage after {self.periods} closed period(s) spent "
            f"wholly at that stage with both legs settled, a difference of at most "
            f"{self.max_difference_pct:g} % and no dead letters in the report's range (legacy "
            f"writes retired because the item moved to its meter-backed price count as settled); "
            f"not ready for primary or meter while a period reconciled with --money bills more "
            f"than {self.max_money_difference} (smallest currency unit) apart on the two paths"
        )

    def verdict(self, stage: Stage, rows: Sequence[LedgerRow]) -> Verdict:
        """The verdict for a customer now at ``stage`` whose ledger rows are ``rows``."""
        periods: dict[str, dict[str, int]] = {}
        for row in rows:
            sums = periods.setdefault(row.period, {})
            for name, value in row.counters.items():
                sums[name] = sums.get(name, 0) + value
        return self.verdict_by_period(stage, periods)

    def verdict_by_period(self, stage: Stage, periods: Mapping[str, Mapping[str, int]]) -> Verdict:
        """The verdict from the customer's counters summed per period (all event names)."""
        return self.verdict_of_counters(
            stage, {period: counters_of(sums)[0] for period, sums in periods.items()}
        )

    def verdict_of_counters(self, stage: Stage, periods: Mapping[str, tuple[int, ...]]) -> Verdict:
        """``verdict_by_period``, the counters of each period as a row tuple (``COUNTERS``): the
        report judges a million customers this way, without naming their counters."""
        next_stage = _NEXT.get(stage)
        if next_stage is None:
            return _DONE
        if stage is Stage.LEGACY:
            return _LEGACY_READY
        dead = good = 0
        retired = False
        for period, sums in periods.items():
            dead += sums[_LEGACY_FAILED_EVENTS] + sums[_METER_FAILED_EVENTS]
            retired = retired or sums[_LEGACY_RETIRED_EVENTS] > 0
            if not dead and self._qualifies(stage, period, sums):
                good += 1
        if dead:
            good = 0
        verdict = self._verdicts.get((stage, dead, good, retired))  # most lines: one seen before
        if verdict is not None:
            return verdict
        return self._verdict(stage, next_stage, dead=dead, good=good, retired=retired)

    def verdict_of_row(self, stage: Stage, period: str, sums: tuple[int, ...]) -> Verdict:
        """``verdict_of_counters(stage, {period: sums})``: a customer with one period (most of
        a report's million), judged without a dict or a loop."""
        if stage is Stage.METER:
            return _DONE
        if stage is Stage.LEGACY:
            return _LEGACY_READY
        dead = sums[_LEGACY_FAILED_EVENTS] + sums[_METER_FAILED_EVENTS]
        good = 1 if not dead and self._qualifies(stage, period, sums) else 0
        retired = sums[_LEGACY_RETIRED_EVENTS] > 0
        verdict = self._verdicts.get((stage, dead, good, retired))
        if verdict is not None:
            return verdict
        return self._verdict(stage, _NEXT[stage], dead=dead, good=good, retired=retired)

    def _verdict(
        self, stage: Stage, next_stage: Stage, *, dead: int, good: int, retired: bool
    ) -> Verdict:
        # Verdicts repeat (a few counts per stage) and are frozen: one object per distinct one.
        key = (stage, dead, good, retired)
        verdict = self._verdicts.get(key)
        if verdict is not None:
            return verdict
        label = stage.value
        if dead:
            reason = f"{dead} dead letter(s): retry or explain them first (`dualwrite dead list`)"
            verdict = Verdict(ready=False, next_stage=next_stage, reason=reason)
        elif good >= self.periods:
            reason = f"{good} closed period(s) at {label} with both legs equal"
            verdict = Verdict(ready=True, next_stage=next_stage, reason=reason)
        else:
            reason = f"{good} of {self.periods} closed period(s) at {label} with both legs equal"
            verdict = Verdict(ready=False, next_stage=next_stage, reason=reason)
        if retired:
            verdict = verdict.model_copy(update={"reason": verdict.reason + _RETIRED_NOTE})
        self._verdicts[key] = verdict
        return verdict

    def _qualifies(self, stage: Stage, period: str, sums: tuple[int, ...]) -> bool:
        closed = self._closed.get(period)
        if closed is None:
            closed = self._closed[period] = period_of(period).closed(self.now)
        if not closed:
            return False
        events = sums[_EVENTS]
        if events == 0 or sums[_STAGE_EVENTS[stage]] != events:
            return False
        # Both legs settled: expected = accepted + retired, nothing failed or refused late.
        if (
            sums[_LE_QTY] != sums[_LA_QTY] + sums[_LR_QTY]
            or sums[_ME_QTY] != sums[_MA_QTY] + sums[_MR_QTY]
            or sums[_LF]
            or sums[_LL]
            or sums[_MF]
            or sums[_ML]
        ):
            return False
        legacy = sums[_LA_QTY] + sums[_LR_QTY]  # legacy_held, inline: a million calls
        meter = sums[_MA_QTY]
        larger = legacy if legacy > meter else meter
        difference = legacy - meter if legacy > meter else meter - legacy
        return larger == 0 or difference * 100 <= self.max_difference_pct * larger

    def with_money(self, verdict: Verdict, drift: CustomerDrift | None) -> Verdict:
        """``verdict``, unless it is ready for primary or meter and the customer's reconciled
        invoices (``reconcile --money``) differ beyond the tolerance: then not ready, and why, in
        money."""
        money = drift.money if drift is not None else None
        if not verdict.ready or verdict.next_stage not in _MONEY_STAGES or money is None:
            return verdict
        if not money.blocks(self.max_money_difference):
            return verdict
        if money.currency_differs:
            why = f"the meter-backed price bills in another currency ({money.currency_differs} period(s))"
        elif money.preview_disagrees:
            why = (
                f"Stripe's invoice preview bills otherwise than computed in "
                f"{money.preview_disagrees} period(s)"
            )
        else:
            worst = format_amount(money.largest_difference or 0, money.currency or "", signed=True)
            why = (
                f"the meter path would bill {worst} in its worst period ({money.differing} of "
                f"{money.priced} priced period(s) differ; tolerance {self.max_money_difference})"
            )
        reason = f"invoices differ: {why}; see `dualwrite reconcile --money`"
        return Verdict(ready=False, next_stage=verdict.next_stage, reason=reason)


_RETIRED_NOTE = (
    " (its retired legacy writes are explained: the item bills through its meter-backed price)"
)
_MONEY_STAGES = (Stage.PRIMARY, Stage.METER)
_STAGE_EVENTS = {stage: AT[f"stage_{stage.value}_events"] for stage in Stage}
_EVENTS = AT["events"]
_LEGACY_FAILED_EVENTS, _METER_FAILED_EVENTS = AT["legacy_failed_events"], AT["meter_failed_events"]
_LEGACY_RETIRED_EVENTS = AT["legacy_retired_events"]
(_LE_QTY, _LA_QTY, _LR_QTY, _LF, _LL), (_ME_QTY, _MA_QTY, _MR_QTY, _MF, _ML) = (
    (
        AT[f"{leg}_expected_qty"],
        AT[f"{leg}_accepted_qty"],
        AT[f"{leg}_retired_qty"],
        AT[f"{leg}_failed_events"],
        AT[f"{leg}_late_refused_events"],
    )
    for leg in ("legacy", "meter")
)
_DONE = Verdict(ready=False, next_stage=None, reason="already on meter events only")
_LEGACY_READY = Verdict(
    ready=True, next_stage=Stage.SHADOW, reason="shadow writes nothing billable"
)
