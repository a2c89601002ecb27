"""The divergence report, built from traffic sent through a real engine (real Redis, the stand-in)."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field

import anyio
import pytest
from rich.console import Console

from dualwrite.config import ReportSettings, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Leg, Stage, utc_day
from dualwrite.outbox import OutboxWorker
from dualwrite.report import (
    CSV_COLUMNS,
    CustomerReport,
    LegTotals,
    ReadinessRule,
    Report,
    build_lines,
    build_report,
    render_csv,
    render_table,
)
from dualwrite.testing import StripeStandin
from tests.conftest import SettingsFactory
from tests.oracle import Oracle
from tests.support import (
    EVENT_NAME,
    Scenario,
    refuse_meter_event,
    refuse_usage_record_once,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio

DAY = 86400
REFUSED_QTY = 6
"""The shadow meter event of the ``refused`` customer carrying this quantity is refused for good."""


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """UTC-day periods: these tests filter by days (billing periods: tests/engine/test_periods.py)."""
    return standin_settings(ledger={"periods": "day"})


async def drain(engine: DualWriteEngine) -> None:
    """Deliver every shadow write (retries included)."""
    with anyio.fail_after(20):
        await OutboxWorker(engine.outbox, engine.writer).drain()


@dataclass
class Traffic:
    """What was sent: a scenario per role, and what each caller was told (the oracle)."""

    scenarios: dict[str, Scenario]
    oracle: Oracle = field(default_factory=Oracle)
    old_period: str = ""

    def customer(self, role: str) -> str:
        """The Stripe customer id playing ``role``."""
        return self.scenarios[role].customer


ROLES = {
    "legacy": Stage.LEGACY,
    "shadow": Stage.SHADOW,
    "refused": Stage.SHADOW,
    "primary": Stage.PRIMARY,
    "meter": Stage.METER,
}
QUANTITIES = {
    "legacy": (3, 4),
    "shadow": (2, 5),
    "refused": (REFUSED_QTY, 1),
    "primary": (9, 2),
    "meter": (8,),
}


async def send(
    engine: DualWriteEngine,
    sent: Traffic,
    role: str,
    quantity: int,
    *,
    accepted: bool = True,
    timestamp: int | None = None,
) -> None:
    """Record usage through the engine, check the caller gets the answer the test planned, and tell
    the oracle (the planned answer and the planned fate of the shadow, not the engine's outcome)."""
    event = usage(sent.scenarios[role], quantity, timestamp=timestamp)
    outcome = await engine.record(event)
    assert outcome.accepted is accepted, outcome.authoritative.failure
    refused = role == "refused" and quantity == REFUSED_QTY
    sent.oracle.tell(
        sent.scenarios[role],
        quantity,
        timestamp=event.timestamp,
        accepted=accepted,
        shadow="refused" if refused else "accepted",
    )


@pytest.fixture
async def traffic(engine, builder, standin: StripeStandin) -> Traffic:
    """Usage for a customer at each stage (two at shadow), not yet drained.

    Injected: one authoritative refusal for the legacy customer (the caller's error, not
    divergence), and a permanent refusal of one shadow meter event of the ``refused`` customer.
    The meter customer also has an event two days old (its own period).
    """
    sent = Traffic({role: await builder.customer(role.title()) for role in ROLES})
    for role, stage in ROLES.items():
        await set_stage(engine, sent.customer(role), stage)
        sent.oracle.set_stage(sent.scenarios[role], stage)
    refuse_meter_event(standin, sent.customer("refused"), REFUSED_QTY)
    refuse_usage_record_once(standin, sent.scenarios["legacy"].item)
    await send(engine, sent, "legacy", 50, accepted=False)
    for role, quantities in QUANTITIES.items():
        for quantity in quantities:
            await send(engine, sent, role, quantity)
    old = int(time.time()) - 2 * DAY
    sent.old_period = utc_day(old)
    await send(engine, sent, "meter", 4, timestamp=old)
    return sent


def expected_legs(traffic: Traffic, customer: str) -> dict[Leg, LegTotals]:
    """Each leg's totals once drained, from what callers were told at the stages the test set."""
    return {
        leg: LegTotals.model_validate(dict(traffic.oracle.expected(customer, leg))) for leg in Leg
    }


def rows_by_customer(report: Report) -> dict[str, CustomerReport]:
    """The report's customer lines by customer id."""
    return {row.customer: row for row in report.customers}


class TestTotals:
    """The report's totals are the sum of what engine.record() reported, per customer and leg."""

    async def test_totals_equal_what_callers_were_told(self, engine, builder, traffic, standin):
        """After draining, each leg's counters equal what callers were told at the stages the test
        set, and so do Stripe's own summaries and every ledger row."""
        await drain(engine)
        await traffic.oracle.assert_stripe(builder.client)
        await traffic.oracle.assert_ledger(engine.ledger)
        report = await build_report(engine.ledger, engine.resolver)
        rows = rows_by_customer(report)
        assert set(rows) == {traffic.customer(role) for role in ROLES}
        for role, stage in ROLES.items():
            scenario = traffic.scenarios[role]
            row = rows[scenario.customer]
            accepted = [
                told.quantity
                for told in traffic.oracle.told
                if told.scenario is scenario and told.accepted
            ]
            expected = expected_legs(traffic, scenario.customer)
            assert row.stage is stage
            assert (row.events, row.quantity) == (len(accepted), sum(accepted)), role
            assert row.legacy == expected[Leg.LEGACY], role
            assert row.meter == expected[Leg.METER], role
            assert row.legacy.accepted_qty == standin.legacy_total(scenario.item), role
            assert row.meter.accepted_qty == standin.meter_total(scenario.customer, EVENT_NAME)
            assert row.event_names == [EVENT_NAME]

    async def test_authoritative_refusal_is_counted_not_divergence(self, engine, traffic):
        """The caller's refused legacy write is a refused event, and the customer stays at parity."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver)
        row = rows_by_customer(report)[traffic.customer("legacy")]
        assert row.legacy.refused_events == 1 and row.legacy.accepted_qty == 7
        assert row.divergent_events == 0 and row.status == "parity"

    async def test_divergence_is_reported(self, engine, traffic):
        """The refused shadow write makes its customer diverged, with a shadow_refused record."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver)
        row = rows_by_customer(report)[traffic.customer("refused")]
        assert row.status == "diverged" and row.divergent_events == 1
        assert row.meter.failed_qty == REFUSED_QTY and row.difference == REFUSED_QTY
        assert report.divergent_customers == 1
        [record] = report.divergences
        assert record.customer == traffic.customer("refused")
        assert record.kind == "shadow_refused" and record.quantity == REFUSED_QTY
        assert record.legacy.status == "accepted" and record.meter.status == "refused"


class TestDifference:
    """The legs' difference compares only the periods where both legs were expected."""

    async def test_meter_periods_beside_primary_ones_are_no_difference(self, engine, builder):
        """A customer at ``meter`` (no legacy write) whose earlier ``primary`` periods are in the
        window: equal legs where both were written, so no difference (was -37.5 %)."""
        started = int(time.time()) - 3 * DAY  # so the legacy leg takes usage two days old
        scenario = await builder.customer("Moved", anchor=started)
        await set_stage(engine, scenario.customer, Stage.PRIMARY)
        assert (await engine.record(usage(scenario, 5, timestamp=started + DAY))).accepted
        await drain(engine)
        await set_stage(engine, scenario.customer, Stage.METER)
        assert (await engine.record(usage(scenario, 3))).accepted
        report = await build_report(engine.ledger, engine.resolver, customer=scenario.customer)
        (line,) = report.customers
        assert line.stage is Stage.METER and len(line.periods) == 2
        assert (line.legacy.accepted_qty, line.meter.accepted_qty) == (5, 8)
        assert line.difference_pct == 0


class TestStatus:
    """parity, pending and diverged, before and after the outbox is drained."""

    async def test_pending_before_draining(self, engine, traffic):
        """Customers with shadow writes in the outbox are pending; the others are at parity."""
        report = await build_report(engine.ledger, engine.resolver, outbox=engine.outbox)
        status = {row.customer: row.status for row in report.customers}
        assert status == {
            traffic.customer("legacy"): "parity",
            traffic.customer("shadow"): "pending",
            traffic.customer("refused"): "pending",
            traffic.customer("primary"): "pending",
            traffic.customer("meter"): "parity",
        }
        shadow = rows_by_customer(report)[traffic.customer("shadow")]
        assert shadow.meter.pending_qty == 7 and shadow.meter.pending_events == 2
        assert shadow.legacy.pending_qty == 0
        primary = rows_by_customer(report)[traffic.customer("primary")]
        assert primary.legacy.pending_qty == 11 and primary.meter.accepted_qty == 11
        assert report.outbox is not None and report.outbox.outstanding == 6
        assert report.divergences == []

    async def test_parity_after_draining(self, engine, traffic):
        """Drained: every customer but the refused one is at parity, with equal shadow-leg totals."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver, outbox=engine.outbox)
        for row in report.customers:
            if row.customer == traffic.customer("refused"):
                continue
            assert row.status == "parity", row.customer
            if row.stage in (Stage.SHADOW, Stage.PRIMARY):
                assert row.legacy.accepted_qty == row.meter.accepted_qty > 0
                assert row.difference == 0
        assert report.outbox is not None
        assert report.outbox.outstanding == 0 and report.outbox.dead == 1

    async def test_stage_is_the_current_one(self, engine, traffic):
        """A customer's stage in the report is where it is now, not where it was."""
        await set_stage(engine, traffic.customer("shadow"), Stage.METER)
        report = await build_report(engine.ledger, engine.resolver)
        assert rows_by_customer(report)[traffic.customer("shadow")].stage is Stage.METER


class TestFilters:
    """customer, stage, since/until and only_divergent narrow the report."""

    async def test_customer(self, engine, traffic):
        """customer= keeps that customer and its divergences only."""
        await drain(engine)
        report = await build_report(
            engine.ledger, engine.resolver, customer=traffic.customer("shadow")
        )
        assert [row.customer for row in report.customers] == [traffic.customer("shadow")]
        assert report.divergences == []
        report = await build_report(
            engine.ledger, engine.resolver, customer=traffic.customer("refused")
        )
        assert len(report.customers) == 1 and len(report.divergences) == 1

    async def test_stage(self, engine, traffic):
        """stage= keeps customers now at that stage, and only their divergences."""
        await drain(engine)
        shadow = await build_report(engine.ledger, engine.resolver, stage=Stage.SHADOW)
        assert {row.customer for row in shadow.customers} == {
            traffic.customer("shadow"),
            traffic.customer("refused"),
        }
        assert len(shadow.divergences) == 1
        legacy = await build_report(engine.ledger, engine.resolver, stage=Stage.LEGACY)
        assert [row.customer for row in legacy.customers] == [traffic.customer("legacy")]
        assert legacy.divergences == []

    async def test_customer_and_other_stage(self, engine, traffic):
        """A customer at another stage than the one asked for is left out."""
        report = await build_report(
            engine.ledger, engine.resolver, customer=traffic.customer("meter"), stage=Stage.SHADOW
        )
        assert report.customers == []

    async def test_only_divergent(self, engine, traffic):
        """only_divergent keeps the diverged customers and their divergence records."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver, only_divergent=True)
        assert [row.customer for row in report.customers] == [traffic.customer("refused")]
        assert [record.customer for record in report.divergences] == [traffic.customer("refused")]

    async def test_since_and_until(self, engine, traffic):
        """Periods are UTC days, both bounds inclusive."""
        await drain(engine)
        today = utc_day(int(time.time()))
        old = await build_report(engine.ledger, engine.resolver, until=traffic.old_period)
        [row] = old.customers
        assert row.customer == traffic.customer("meter")
        assert row.quantity == 4 and row.periods == [traffic.old_period]
        assert (old.since, old.until) == (None, traffic.old_period)
        recent = await build_report(engine.ledger, engine.resolver, since=today, until=today)
        meter = rows_by_customer(recent)[traffic.customer("meter")]
        assert meter.quantity == 8 and meter.periods == [today]
        assert len(recent.customers) == len(ROLES)
        both = await build_report(
            engine.ledger, engine.resolver, since=traffic.old_period, until=today
        )
        assert rows_by_customer(both)[traffic.customer("meter")].quantity == 12
        assert rows_by_customer(both)[traffic.customer("meter")].periods == sorted(
            [traffic.old_period, today]
        )

    async def test_divergence_limit(self, engine, traffic):
        """divergence_limit caps the records listed, not the counts."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver, divergence_limit=0)
        assert report.divergences == [] and report.divergent_customers == 1


class TestOutput:
    """The report serialises to JSON and back, and renders as tables."""

    async def test_json_round_trip(self, engine, traffic):
        """Report.model_validate_json(report.model_dump_json()) == report."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver, outbox=engine.outbox)
        assert report.divergences and report.outbox is not None
        assert Report.model_validate_json(report.model_dump_json()) == report

    async def test_lines_equal_validated_copies(self, engine, traffic):
        """Lines are built without validation (``trusted``): each equals its validated copy, field
        for field and in type, and serialises the same."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver)
        assert len(report.customers) == len(ROLES)
        for line in report.customers:
            copy = CustomerReport.model_validate(line.model_dump())
            assert copy == line and copy.model_dump_json() == line.model_dump_json()
            for name, value in copy:
                assert type(getattr(line, name)) is type(value), name
            for leg in (line.legacy, line.meter):
                assert LegTotals.model_validate(leg.model_dump()) == leg
            assert line.model_fields_set == copy.model_fields_set
        # Lines share one fields-set per model class: a copy with changes leaves the others' alone.
        first, second = report.customers[:2]
        changed = first.model_copy(update={"status": "unverified"})
        assert changed.status == "unverified" and first.status != "unverified"
        assert second.model_fields_set == set(CustomerReport.model_fields)

    async def test_lines_of_a_few_customers_equal_the_reports(self, engine, traffic):
        """``build_lines`` (the guard's read between full passes) gives a customer the report's
        line, but for the divergence log's excerpt and the reconciliation drift."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver)
        wanted = [line.customer for line in report.customers][1:4]
        lines = await build_lines(engine.ledger, engine.resolver, [*wanted, "cus_without_rows"])
        assert lines == [
            line.model_copy(update={"recent_divergences": [], "drift": None})
            for line in report.customers
            if line.customer in wanted
        ]

    async def test_empty_report(self, engine):
        """No traffic: no customers, no divergences, and no outbox line unless asked."""
        report = await build_report(engine.ledger, engine.resolver)
        assert report.customers == [] and report.divergences == [] and report.outbox is None
        assert Report.model_validate_json(report.model_dump_json()) == report

    async def test_render_table(self, engine, traffic):
        """The table shows each customer with its totals, the outbox, and the divergent events."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver, outbox=engine.outbox)
        console = Console(record=True, width=200)
        console.print(render_table(report))
        text = console.export_text()
        assert "dualwrite: usage per customer, legacy vs meter" in text
        customer_table = text.split("latest divergent events")[0]
        lines = {
            line.split("│")[1].strip(): line
            for line in customer_table.splitlines()
            if line.startswith("│")
        }
        for role, stage in ROLES.items():
            line = lines[traffic.customer(role)]
            assert stage.value in line
        refused = lines[traffic.customer("refused")]
        assert "diverged" in refused and "+6 (+85.71 %)" in refused
        assert "meter:shadow:parameter_invalid 1" in refused
        assert "parity" in lines[traffic.customer("shadow")]
        assert "outbox: 0 queued, 0 waiting to retry, 1 dead letters" in text
        assert "latest divergent events" in text and "shadow_refused" in text
        assert "refused by the test" in text

    async def test_render_pending(self, engine, traffic):
        """Before draining, the pending column shows what is still owed."""
        report = await build_report(engine.ledger, engine.resolver)
        console = Console(record=True, width=200)
        console.print(render_table(report))
        line = next(
            line
            for line in console.export_text().splitlines()
            if traffic.customer("shadow") in line
        )
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        assert cells[6] == "7" and cells[8] == "pending"


class TestReportDetails:
    """Failures by code, the difference in percent, each customer's latest divergent events."""

    async def test_failures_by_leg_and_code(self, engine, traffic):
        """The legacy customer's refusal and the refused customer's dead letter, by Stripe code."""
        await drain(engine)
        rows = rows_by_customer(await build_report(engine.ledger, engine.resolver))
        assert rows[traffic.customer("legacy")].failures == {"legacy:parameter_invalid": 1}
        refused = rows[traffic.customer("refused")]
        assert refused.failures == {"meter:shadow:parameter_invalid": 1}
        assert refused.difference == REFUSED_QTY and refused.difference_pct == round(
            REFUSED_QTY * 100 / (REFUSED_QTY + 1), 4
        )
        [record] = refused.recent_divergences
        assert record.kind == "shadow_refused" and record.legacy.stripe_id
        assert rows[traffic.customer("legacy")].difference_pct is None  # one leg only

    async def test_csv_has_a_line_per_customer(self, engine, traffic):
        """CSV: a header, then one line per customer with the report's figures."""
        await drain(engine)
        report = await build_report(engine.ledger, engine.resolver)
        parsed = list(csv.DictReader(io.StringIO(render_csv(report))))
        assert tuple(parsed[0].keys()) == CSV_COLUMNS
        by_customer = {line["customer"]: line for line in parsed}
        assert set(by_customer) == {line.customer for line in report.customers}
        refused = by_customer[traffic.customer("refused")]
        assert refused["status"] == "diverged" and refused["difference"] == str(REFUSED_QTY)
        assert refused["failures"] == "meter:shadow:parameter_invalid=1"


class TestReadiness:
    """The readiness verdict flips with a divergence, by the configured rule."""

    async def test_verdicts(self, engine, traffic):
        """Nothing closed yet: shadow not ready; after the period, parity is ready, divergence not."""
        await drain(engine)
        now = await build_report(engine.ledger, engine.resolver)
        rows = rows_by_customer(now)
        assert rows[traffic.customer("legacy")].verdict.ready
        assert rows[traffic.customer("meter")].verdict.next_stage is None
        shadow = rows[traffic.customer("shadow")].verdict
        assert not shadow.ready and shadow.reason.startswith("0 of 1 closed period(s)")
        later = rows_by_customer(
            await build_report(engine.ledger, engine.resolver, now=time.time() + 40 * DAY)
        )
        assert later[traffic.customer("shadow")].verdict.ready
        assert later[traffic.customer("primary")].verdict.ready
        refused = later[traffic.customer("refused")].verdict
        assert not refused.ready and "dead letter" in refused.reason
        assert "closed period" in now.readiness_rule

    async def test_rule_is_configurable(self, engine, traffic):
        """Two closed periods required: one is not enough."""
        await drain(engine)
        settings = ReportSettings(readiness_closed_periods=2)
        later = rows_by_customer(
            await build_report(
                engine.ledger, engine.resolver, now=time.time() + 40 * DAY, settings=settings
            )
        )
        assert not later[traffic.customer("shadow")].verdict.ready


def clean_period(stage: Stage, legacy: int, meter: int) -> dict[str, int]:
    """One period's counters: ``events`` at ``stage``, each leg settled with what it expected."""
    return {
        "events": 4,
        "quantity": legacy,
        f"stage_{stage.value}_events": 4,
        "legacy_expected_qty": legacy,
        "legacy_accepted_qty": legacy,
        "meter_expected_qty": meter,
        "meter_accepted_qty": meter,
    }


#: Closed UTC days, long past whatever ``now`` a test runs at.
CLOSED_DAYS = ("2025-01-05", "2025-01-06", "2025-01-07", "2025-01-08")


class TestReadinessRule:
    """The verdict's rule itself, on counters the test writes: each clause decides on its own."""

    @pytest.mark.parametrize(
        ("max_pct", "meter", "ready"),
        [(5, 97, True), (2, 97, False), (0, 100, True), (0, 99, False), (3, 97, True)],
    )
    def test_the_difference_allowed_between_legs(self, max_pct, meter, ready):
        """A settled period whose legs hold 100 and ``meter`` counts only within max_difference_pct."""
        rule = ReadinessRule(ReportSettings(readiness_max_difference_pct=max_pct), now=time.time())
        verdict = rule.verdict_by_period(
            Stage.SHADOW, {CLOSED_DAYS[0]: clean_period(Stage.SHADOW, 100, meter)}
        )
        assert (verdict.ready, verdict.next_stage) == (ready, Stage.PRIMARY)

    @pytest.mark.parametrize("dead_at", [0, 3])
    @pytest.mark.parametrize("stage", [Stage.SHADOW, Stage.PRIMARY])
    def test_a_dead_letter_is_never_outweighed(self, stage, dead_at):
        """Three clean closed periods and one with a dead letter (first or last): not ready, even
        when one clean period is all the rule asks for."""
        rule = ReadinessRule(ReportSettings(readiness_closed_periods=1), now=time.time())
        periods = {day: clean_period(stage, 10, 10) for day in CLOSED_DAYS}
        periods[CLOSED_DAYS[dead_at]] |= {"meter_failed_events": 1, "meter_failed_qty": 10}
        verdict = rule.verdict_by_period(stage, periods)
        assert not verdict.ready
        periods[CLOSED_DAYS[dead_at]] = clean_period(stage, 10, 10)
        assert rule.verdict_by_period(stage, periods).ready  # the dead letter alone decided

    def test_closed_periods_counted_at_the_stage_only(self):
        """Periods spent partly at another stage do not count towards the required number."""
        rule = ReadinessRule(ReportSettings(readiness_closed_periods=2), now=time.time())
        periods = {day: clean_period(Stage.SHADOW, 10, 10) for day in CLOSED_DAYS[:2]}
        assert rule.verdict_by_period(Stage.SHADOW, periods).ready
        periods[CLOSED_DAYS[1]] = {**periods[CLOSED_DAYS[1]], "stage_shadow_events": 3}
        assert not rule.verdict_by_period(Stage.SHADOW, periods).ready

    @pytest.mark.parametrize("leg", ["legacy", "meter"])
    def test_a_leg_still_pending_is_not_ready(self, leg):
        """Both legs hold 5, but one still expects 10 (a shadow in flight): not settled, not ready."""
        rule = ReadinessRule(ReportSettings(), now=time.time())
        period = clean_period(Stage.SHADOW, 5, 5) | {f"{leg}_expected_qty": 10}
        assert not rule.verdict_by_period(Stage.SHADOW, {CLOSED_DAYS[0]: period}).ready

    def test_a_period_of_one_event_counts(self):
        """One event, settled on both legs, makes a closed period that counts."""
        rule = ReadinessRule(ReportSettings(), now=time.time())
        period = clean_period(Stage.PRIMARY, 3, 3) | {"events": 1, "stage_primary_events": 1}
        verdict = rule.verdict_by_period(Stage.PRIMARY, {CLOSED_DAYS[0]: period})
        assert (verdict.ready, verdict.next_stage) == (True, Stage.METER)
