"""The readiness verdict: is a customer ready for its next stage? The rule is configurable
(``[report]``) and printed with every report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dualwrite.config import ReportSettings
from dualwrite.ledger import LedgerRow
from dualwrite.models import Stage
from dualwrite.periods import period_of
from dualwrite.pricing import format_amount
from dualwrite.report._models import CustomerDrift, Verdict, legacy_held

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
        next_stage = _NEXT.get(stage)
        if next_stage is None:
            return _DONE
        if stage is Stage.LEGACY:
            return _LEGACY_READY
        dead = good = 0
        retired = False
        for period, sums in periods.items():
            dead += sums.get("legacy_failed_events", 0) + sums.get("meter_failed_events", 0)
            retired = retired or sums.get("legacy_retired_events", 0) > 0
            if not dead and self._qualifies(stage, period, sums):
                good += 1
        if dead:
            return self._verdict(stage, next_stage, dead=dead, good=0, retired=retired)
        return self._verdict(stage, next_stage, dead=0, good=good, retired=retired)

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

    def _qualifies(self, stage: Stage, period: str, sums: Mapping[str, int]) -> bool:
        closed = self._closed.get(period)
        if closed is None:
            closed = self._closed[period] = period_of(period).closed(self.now)
        if not closed:
            return False
        events = sums.get("events", 0)
        if events == 0 or sums.get(_STAGE_EVENTS[stage], 0) != events:
            return False
        for leg in ("legacy", "meter"):
            settled = sums.get(f"{leg}_accepted_qty", 0) + sums.get(f"{leg}_retired_qty", 0)
            if sums.get(f"{leg}_expected_qty", 0) != settled:
                return False
            if sums.get(f"{leg}_failed_events", 0) or sums.get(f"{leg}_late_refused_events", 0):
                return False
        legacy = legacy_held(sums.get("legacy_accepted_qty", 0), sums.get("legacy_retired_qty", 0))
        meter = sums.get("meter_accepted_qty", 0)
        larger = max(legacy, meter)
        return larger == 0 or abs(legacy - meter) * 100 <= self.max_difference_pct * larger

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
_STAGE_EVENTS = {stage: f"stage_{stage.value}_events" for stage in Stage}
_DONE = Verdict(ready=False, next_stage=None, reason="already on meter events only")
_LEGACY_READY = Verdict(
    ready=True, next_stage=Stage.SHADOW, reason="shadow writes nothing billable"
)
