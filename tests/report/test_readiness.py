"""The readiness verdict, one rule at a time: each test changes one thing about an otherwise ready
customer and checks ``ready`` itself (not the reason's wording), so a verdict that drops a rule
fails here."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from dualwrite.config import ReportSettings
from dualwrite.ledger import LedgerRow
from dualwrite.models import Stage, utc_day
from dualwrite.report import CustomerDrift, CustomerMoney, LegDrift, ReadinessRule, Verdict

DAY = 86_400
NOW = 1_800_000_000 + DAY // 2  # noon UTC: "today" is open, "yesterday" closed


def period(days_ago: int) -> str:
    """The UTC-day period ``days_ago`` days before ``NOW`` (0: today, still open)."""
    return utc_day(NOW - days_ago * DAY)


def counters(
    stage: Stage = Stage.SHADOW, /, *, legacy: int = 10, meter: int = 10, **changed: int
) -> dict[str, int]:
    """A period's counters: two events at ``stage``, both legs holding what they should."""
    sums = {
        "events": 2,
        "quantity": legacy,
        f"stage_{stage.value}_events": 2,
        "legacy_expected_events": 2,
        "legacy_expected_qty": legacy,
        "legacy_accepted_events": 2,
        "legacy_accepted_qty": legacy,
        "meter_expected_events": 2,
        "meter_expected_qty": meter,
        "meter_accepted_events": 2,
        "meter_accepted_qty": meter,
    }
    sums.update(changed)
    return sums


def verdict_of(
    periods: Mapping[str, Mapping[str, int]],
    stage: Stage = Stage.SHADOW,
    *,
    closed_periods: int = 1,
    max_difference_pct: float = 0.0,
) -> tuple[bool, Stage | None]:
    """(ready, next stage) by a rule with these settings, judged at ``NOW``."""
    settings = ReportSettings(
        readiness_closed_periods=closed_periods, readiness_max_difference_pct=max_difference_pct
    )
    verdict = ReadinessRule(settings, now=NOW).verdict_by_period(stage, periods)
    return verdict.ready, verdict.next_stage


class TestStages:
    """Where the rule starts and ends."""

    def test_legacy_is_always_ready_for_shadow(self) -> None:
        """Shadow bills nothing: legacy is ready with no history at all."""
        assert verdict_of({}, Stage.LEGACY) == (True, Stage.SHADOW)

    def test_meter_has_no_next_stage(self) -> None:
        """A meter customer is done, however clean its periods."""
        assert verdict_of({period(1): counters(Stage.METER)}, Stage.METER) == (False, None)

    @pytest.mark.parametrize(
        ("stage", "after"), [(Stage.SHADOW, Stage.PRIMARY), (Stage.PRIMARY, Stage.METER)]
    )
    def test_one_clean_closed_period_is_ready(self, stage: Stage, after: Stage) -> None:
        """The baseline every other test changes one thing of."""
        assert verdict_of({period(1): counters(stage)}, stage) == (True, after)
        assert verdict_of({}, stage) == (False, after)


class TestPeriods:
    """Which periods count."""

    def test_open_period_does_not_count(self) -> None:
        """Today's period, clean so far, is not closed yet."""
        assert verdict_of({period(0): counters()}) == (False, Stage.PRIMARY)

    def test_needs_the_configured_number_of_closed_periods(self) -> None:
        """Two required: one clean period is not enough, two are."""
        one = {period(1): counters()}
        assert verdict_of(one, closed_periods=2)[0] is False
        assert verdict_of({**one, period(2): counters()}, closed_periods=2)[0] is True

    def test_period_partly_at_another_stage_does_not_count(self) -> None:
        """A period half spent at legacy is not a period at shadow."""
        split = counters(stage_shadow_events=1, stage_legacy_events=1)
        assert verdict_of({period(1): split})[0] is False

    def test_period_of_one_event_at_another_stage_does_not_count(self) -> None:
        """One event, recorded at legacy (no shadow events at all), is no period at shadow."""
        at_legacy = counters(events=1, stage_shadow_events=0, stage_legacy_events=1)
        del at_legacy["stage_shadow_events"]
        assert verdict_of({period(1): at_legacy})[0] is False

    def test_period_without_events_does_not_count(self) -> None:
        """An empty period proves nothing."""
        empty = counters(legacy=0, meter=0, events=0, stage_shadow_events=0)
        assert verdict_of({period(1): empty})[0] is False


class TestLegs:
    """Both legs settled, equal within the limit."""

    @pytest.mark.parametrize("leg", ["legacy", "meter"])
    def test_unsettled_leg_does_not_count(self, leg: str) -> None:
        """A write still pending on either leg keeps the period out (the accepted totals agree)."""
        pending = counters(**{f"{leg}_expected_qty": 13, f"{leg}_expected_events": 3})
        assert verdict_of({period(1): pending})[0] is False

    @pytest.mark.parametrize("leg", ["legacy", "meter"])
    def test_leg_with_nothing_accepted_yet_does_not_count(self, leg: str) -> None:
        """One unit expected on a leg, nothing accepted there yet (no accepted counters at all):
        not settled, whatever the difference allowed."""
        other = "meter" if leg == "legacy" else "legacy"
        pending = counters(**{f"{leg}_expected_qty": 1, f"{other}_expected_qty": 1})
        pending.update({f"{other}_accepted_qty": 1, "events": 1, "stage_shadow_events": 1})
        for name in (f"{leg}_accepted_qty", f"{leg}_accepted_events"):
            del pending[name]
        assert verdict_of({period(1): pending}, max_difference_pct=100.0)[0] is False

    def test_late_refusal_does_not_count(self) -> None:
        """A period with a meter event Stripe refused after accepting it stays out, even when the
        totals were made whole again (a resend)."""
        late = counters(meter_late_refused_events=1, meter_late_refused_qty=3)
        assert verdict_of({period(1): late})[0] is False

    @pytest.mark.parametrize(
        "counter",
        [
            "legacy_failed_events",
            "legacy_late_refused_events",
            "meter_failed_events",
            "meter_late_refused_events",
        ],
    )
    def test_any_failed_or_late_refused_write_does_not_count(self, counter: str) -> None:
        """A failed or late-refused write of no units on either leg keeps the period out: each
        counter is its own rule, even when the quantities add up."""
        assert verdict_of({period(1): counters(**{counter: 1})})[0] is False

    @pytest.mark.parametrize(
        ("limit", "ready"), [(0.0, False), (4.99, False), (5.0, True), (20.0, True)]
    )
    def test_difference_limit(self, limit: float, ready: bool) -> None:
        """Legs of 100 and 95 (5 % of the larger) are ready only with a limit of 5 % or more."""
        periods = {period(1): counters(legacy=100, meter=95)}
        assert verdict_of(periods, max_difference_pct=limit)[0] is ready

    def test_one_unit_against_none_is_a_difference(self) -> None:
        """Legs of 1 and 0 (a ``set`` translated to nothing on the meter): 100 % apart."""
        assert verdict_of({period(1): counters(legacy=1, meter=0)})[0] is False
        assert verdict_of({period(1): counters(legacy=0, meter=0)})[0] is True

    def test_every_legacy_shadow_retired_counts_as_settled(self) -> None:
        """No legacy write accepted at all (no accepted counter in the ledger), every one retired:
        the legacy side holds the 10 retired units, as the meter does."""
        periods = {period(1): retired()}
        for name in ("legacy_accepted_qty", "legacy_accepted_events"):
            del periods[period(1)][name]
        assert verdict_of(periods, Stage.PRIMARY) == (True, Stage.METER)

    def test_retired_legacy_writes_count_as_settled(self) -> None:
        """A primary customer whose legacy shadows were retired (the item moved to the meter
        price) holds on the legacy side what the meter holds: ready for meter."""
        assert verdict_of({period(1): retired()}, Stage.PRIMARY) == (True, Stage.METER)

    def test_retired_writes_do_not_hide_a_difference(self) -> None:
        """Retired legacy 10 against a meter of 5 is still a 50 % difference."""
        periods = {period(1): retired(meter=5)}
        assert verdict_of(periods, Stage.PRIMARY, max_difference_pct=10)[0] is False


def retired(*, meter: int = 10) -> dict[str, int]:
    """A primary period whose two legacy shadows (10 units) were both retired."""
    return counters(
        Stage.PRIMARY,
        meter=meter,
        legacy_accepted_qty=0,
        legacy_accepted_events=0,
        legacy_retired_qty=10,
        legacy_retired_events=2,
    )


class TestDeadLetters:
    """A dead letter anywhere in the range is never outweighed by clean periods."""

    @pytest.mark.parametrize("leg", ["legacy", "meter"])
    @pytest.mark.parametrize("first", [True, False])
    def test_dead_letter_blocks_however_many_clean_periods(self, leg: str, first: bool) -> None:
        """Five clean closed periods and one with a dead letter (listed first or last): not
        ready."""
        dead = {
            period(9): counters(
                **{
                    f"{leg}_accepted_qty": 6,
                    f"{leg}_accepted_events": 1,
                    f"{leg}_failed_qty": 4,
                    f"{leg}_failed_events": 1,
                }
            )
        }
        clean = {period(days): counters() for days in range(1, 6)}
        periods = {**dead, **clean} if first else {**clean, **dead}
        assert verdict_of(periods) == (False, Stage.PRIMARY)
        assert verdict_of(clean)[0] is True

    def test_dead_letters_on_both_legs_add_up(self) -> None:
        """One dead letter on each leg: two, not none; the reason counts them."""
        both = counters(legacy_failed_events=1, meter_failed_events=1)
        rule = ReadinessRule(ReportSettings(), now=NOW)
        verdict = rule.verdict_by_period(Stage.SHADOW, {period(1): both})
        assert (verdict.ready, verdict.next_stage) == (False, Stage.PRIMARY)
        assert verdict.reason.startswith("2 dead letter(s)")

    def test_dead_letter_in_the_open_period_blocks(self) -> None:
        """Even today's dead letter, in a period that does not count yet, blocks the verdict."""
        periods = {
            period(1): counters(),
            period(0): counters(meter_failed_events=1, meter_failed_qty=10, meter_accepted_qty=0),
        }
        assert verdict_of(periods)[0] is False


class TestLedgerRows:
    """``verdict(stage, rows)``: the rows of one period (one per meter event name) are judged
    together, as the report's sums per period are."""

    def test_rows_of_one_period_are_summed(self) -> None:
        """Two event names in one closed period, 10 against 10 and 0 against 1: summed, 10
        against 11, they are 9.09 % apart (ready with a 9.1 % limit, not with 9 %)."""
        rule = ReadinessRule(ReportSettings(readiness_max_difference_pct=9.0), now=NOW)
        rows = [
            LedgerRow(period(1), "cus_a", "api", counters()),
            LedgerRow(period(1), "cus_a", "seats", counters(legacy=0, meter=1)),
        ]
        assert rule.verdict(Stage.SHADOW, rows).ready is False
        lenient = ReadinessRule(ReportSettings(readiness_max_difference_pct=9.1), now=NOW)
        assert lenient.verdict(Stage.SHADOW, rows).ready is True
        assert lenient.verdict(Stage.SHADOW, rows[:1]) == lenient.verdict_by_period(
            Stage.SHADOW, {period(1): counters()}
        )

    def test_rows_of_two_periods_count_twice(self) -> None:
        """Two closed periods are two periods (two required)."""
        rule = ReadinessRule(ReportSettings(readiness_closed_periods=2), now=NOW)
        one = [LedgerRow(period(1), "cus_a", "api", counters())]
        two = [*one, LedgerRow(period(2), "cus_a", "api", counters())]
        assert rule.verdict(Stage.SHADOW, one).ready is False
        assert rule.verdict(Stage.SHADOW, two).ready is True


def money(**fields: int | str | None) -> CustomerDrift:
    """A reconciliation with ``--money`` whose invoices are as given (both legs compared)."""
    return CustomerDrift(
        checked_at=NOW,
        records=3,
        legacy=LegDrift(compared=3),
        meter=LegDrift(compared=3),
        money=CustomerMoney.model_validate({"priced": 3, "currency": "usd", **fields}),
    )


class TestMoney:
    """``with_money``: invoices that differ beyond the tolerance keep a customer off primary and
    meter; nothing else changes the verdict."""

    READY = Verdict(ready=True, next_stage=Stage.PRIMARY, reason="1 closed period(s)")

    def rule(self, tolerance: int = 0) -> ReadinessRule:
        """A rule allowing invoices ``tolerance`` cents apart."""
        return ReadinessRule(ReportSettings(readiness_max_money_difference=tolerance), now=NOW)

    @pytest.mark.parametrize(
        ("worst", "tolerance", "ready"),
        [(0, 0, True), (50, 50, True), (51, 50, False), (-51, 50, False), (1, 0, False)],
    )
    def test_the_worst_period_against_the_tolerance(
        self, worst: int, tolerance: int, ready: bool
    ) -> None:
        """The largest difference of any period (either sign) beyond the tolerance blocks."""
        drift = money(largest_difference=worst, differing=1 if worst else 0)
        verdict = self.rule(tolerance).with_money(self.READY, drift)
        assert (verdict.ready, verdict.next_stage) == (ready, Stage.PRIMARY)

    @pytest.mark.parametrize(
        ("field", "why"),
        [("currency_differs", "another currency"), ("preview_disagrees", "invoice preview")],
    )
    def test_another_currency_or_a_disagreeing_preview_blocks(self, field: str, why: str) -> None:
        """However small the amounts, another currency or Stripe's preview disagreeing blocks,
        and the reason says which."""
        verdict = self.rule(1000).with_money(self.READY, money(**{field: 1}))
        assert (verdict.ready, verdict.next_stage) == (False, Stage.PRIMARY)
        assert "invoices differ" in verdict.reason and why in verdict.reason

    def test_the_reason_names_the_worst_difference_and_the_periods(self) -> None:
        """What an operator needs: the worst period's amount, how many periods differ, of how
        many priced, and the tolerance."""
        drift = money(largest_difference=-1234, differing=2)
        reason = self.rule(100).with_money(self.READY, drift).reason
        assert "-12.34 USD" in reason and "2 of 3 priced" in reason and "tolerance 100" in reason
        more = self.rule(100).with_money(self.READY, money(largest_difference=1234, differing=1))
        assert "+12.34 USD" in more.reason  # the meter path bills more

    def test_no_money_changes_nothing(self) -> None:
        """Never reconciled with ``--money``, or never reconciled at all: the verdict stands."""
        never = money().model_copy(update={"money": None})
        assert self.rule().with_money(self.READY, never) is self.READY
        assert self.rule().with_money(self.READY, None) is self.READY

    def test_only_primary_and_meter_are_guarded(self) -> None:
        """Ready for shadow (nothing billable), not ready already, or done: money changes none."""
        drift = money(largest_difference=500, differing=1)
        for verdict in (
            Verdict(ready=True, next_stage=Stage.SHADOW, reason="shadow writes nothing billable"),
            Verdict(ready=False, next_stage=Stage.PRIMARY, reason="0 of 1"),
            Verdict(ready=False, next_stage=None, reason="already on meter events only"),
        ):
            assert self.rule().with_money(verdict, drift) is verdict
        to_meter = Verdict(ready=True, next_stage=Stage.METER, reason="1 closed period(s)")
        assert self.rule().with_money(to_meter, drift).ready is False


class TestReasons:
    """The reason names the stage, and explains retired writes only when there are some."""

    def reason(self, periods: Mapping[str, Mapping[str, int]], stage: Stage) -> str:
        """The verdict's reason at ``stage``."""
        return ReadinessRule(ReportSettings(), now=NOW).verdict_by_period(stage, periods).reason

    def test_the_stage_is_named(self) -> None:
        """ "1 closed period(s) at shadow", not at another stage."""
        assert "at shadow" in self.reason({period(1): counters()}, Stage.SHADOW)

    def test_retired_writes_are_explained_only_when_there_are_some(self) -> None:
        """No retired write: no word of them; one retired write (in any period): explained."""
        assert "retired" not in self.reason({period(1): counters(Stage.PRIMARY)}, Stage.PRIMARY)
        one = retired()
        one.update(legacy_retired_events=1, legacy_retired_qty=5, legacy_accepted_qty=5)
        one["legacy_accepted_events"] = 1
        periods = {period(2): counters(Stage.PRIMARY), period(1): one}
        assert "retired legacy writes are explained" in self.reason(periods, Stage.PRIMARY)
