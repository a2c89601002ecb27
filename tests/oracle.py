"""An independent oracle for end-to-end and fault tests: what each caller was told, held by the test.

The engine's own outcomes say which leg was written and whether a shadow went out; a test that builds
its expectations from them cannot see the engine drop a shadow together with its ledger entry. The
oracle shares nothing with the engine's logic: the test tells it the stage it set for each customer
and what each caller was told (accepted or refused), and the oracle works out from DESIGN.md's stage
table, written out again here on purpose, which legs must hold the usage. It then compares:

* Stripe's own totals, read over HTTP through the official SDK from the stand-in's summary
  endpoints (usage record summaries per billing period, meter event summaries per window), and
* the ledger, row by row (each row's period holds exactly the usage told in it).

Supported usage: ``increment`` on ``sum`` aggregations (what the fault tests send). Non-sum meters and
``set`` come with the engine's plan-at-first-intercept (issue 13) and are not modelled yet.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import stripe

from dualwrite.ledger import Ledger
from dualwrite.models import Leg, Stage
from tests.support import LEGACY_VERSION, Scenario

__all__ = ["LEGS_AT", "Oracle", "ShadowFate", "Told"]

#: Which legs hold accepted usage at each stage, authoritative first (DESIGN.md, "Stages"). Not
#: ``dualwrite.models.plan_for``: the oracle must not share the engine's mistakes.
LEGS_AT: dict[Stage, tuple[Leg, ...]] = {
    Stage.LEGACY: (Leg.LEGACY,),
    Stage.SHADOW: (Leg.LEGACY, Leg.METER),
    Stage.PRIMARY: (Leg.METER, Leg.LEGACY),
    Stage.METER: (Leg.METER,),
}

ShadowFate = Literal["accepted", "refused", "retired"]
"""What the test made Stripe do with the shadow write: take it, refuse it for good (a divergence),
or refuse it because the item left the legacy system (retired, not a divergence)."""

_SUMMARY_LIMIT = 100


@dataclass(frozen=True, slots=True)
class Told:
    """One caller's answer: the usage, the stage the test had set, and whether it was accepted."""

    scenario: Scenario
    stage: Stage
    quantity: int
    timestamp: int
    accepted: bool
    shadow: ShadowFate = "accepted"


@dataclass
class Oracle:
    """What callers were told, per customer, leg and instant; and the checks against Stripe and the
    ledger that follow from it."""

    stages: dict[str, Stage] = field(default_factory=dict)
    told: list[Told] = field(default_factory=list)

    def set_stage(self, scenario: Scenario, stage: Stage) -> None:
        """Remember the stage the test set for the scenario's customer (before its traffic)."""
        self.stages[scenario.customer] = stage

    def tell(
        self,
        scenario: Scenario,
        quantity: int,
        *,
        timestamp: int,
        accepted: bool,
        shadow: ShadowFate = "accepted",
    ) -> None:
        """Record what a caller was told about ``quantity`` units sent at ``timestamp``."""
        stage = self.stages[scenario.customer]
        self.told.append(Told(scenario, stage, quantity, timestamp, accepted, shadow))

    # ------------------------------------------------------------------------------- expectations

    def expected(
        self, customer: str, leg: Leg, *, start: int | None = None, end: int | None = None
    ) -> Counter[str]:
        """The ledger counters of ``leg`` (``accepted_qty``, ``failed_events``, ...) that the told
        usage of ``customer`` in ``[start, end)`` must produce."""
        counts: Counter[str] = Counter()
        for told in self._of(customer, start, end):
            legs = LEGS_AT[told.stage]
            if leg not in legs:
                continue
            if not told.accepted:
                if leg is legs[0]:
                    counts["refused_events"] += 1
                continue
            fate = "accepted" if leg is legs[0] else told.shadow
            outcome = {"accepted": "accepted", "refused": "failed", "retired": "retired"}[fate]
            for what in ("expected", outcome):
                counts[f"{what}_events"] += 1
                counts[f"{what}_qty"] += told.quantity
        return counts

    def held(
        self, customer: str, leg: Leg, *, start: int | None = None, end: int | None = None
    ) -> int:
        """The units Stripe must hold on ``leg`` for ``customer`` in ``[start, end)``."""
        return self.expected(customer, leg, start=start, end=end)["accepted_qty"]

    def customers(self) -> list[str]:
        """Every customer the test told the oracle about."""
        return sorted(self.stages)

    def _of(self, customer: str, start: int | None, end: int | None) -> Iterable[Told]:
        for told in self.told:
            if told.scenario.customer != customer:
                continue
            if start is not None and told.timestamp < start:
                continue
            if end is not None and told.timestamp >= end:
                continue
            yield told

    def _scenario(self, customer: str) -> Scenario:
        return next(t.scenario for t in self.told if t.scenario.customer == customer)

    # ----------------------------------------------------------------------------------- checks

    async def assert_ledger(self, ledger: Ledger) -> None:
        """Every ledger row of every customer holds exactly what its callers were told in the row's
        period, on each leg; and the rows together hold every told event."""
        for customer in self.customers():
            rows = await ledger.rows(customer=customer)
            covered = 0
            for row in rows:
                span = row.span
                for leg in Leg:
                    want = self.expected(customer, leg, start=span.start, end=span.end)
                    got = {
                        name: row[f"{leg.value}_{name}"]
                        for name in (*want, "accepted_qty", "failed_qty", "retired_qty")
                    }
                    wanted = {name: want[name] for name in got}
                    assert got == wanted, (
                        f"ledger of {customer} in {row.period}, {leg.value} leg: {got} != {wanted}"
                    )
                told = list(self._of(customer, span.start, span.end))
                accepted = [t for t in told if t.accepted]
                divergent = [t for t in accepted if LEGS_AT[t.stage][1:] and t.shadow == "refused"]
                assert (row["events"], row["quantity"], row["divergent_events"]) == (
                    len(accepted),
                    sum(t.quantity for t in accepted),
                    len(divergent),
                ), f"ledger of {customer} in {row.period}: events, quantity, divergent"
                covered += len(told)
            count = len(list(self._of(customer, None, None)))
            assert covered == count, f"{customer}: ledger periods hold {covered} of {count} events"

    async def assert_stripe(self, client: stripe.StripeClient) -> None:
        """Stripe's summaries hold, per customer and leg, exactly the usage callers were told was
        accepted: usage record summaries per billing period (legacy), meter event summaries over
        the minutes the usage was sent in (meter)."""
        for customer in self.customers():
            scenario = self._scenario(customer)
            for start, end, total in await legacy_summaries(client, scenario.item):
                assert total == self.held(customer, Leg.LEGACY, start=start, end=end), (
                    f"legacy usage of {customer} ({scenario.item}) in [{start}, {end})"
                )
            stamps = [t.timestamp for t in self._of(customer, None, None)]
            start, end = min(stamps) // 60 * 60, (max(stamps) // 60 + 1) * 60
            value = await meter_summary(client, scenario.meter, customer, start, end)
            assert value == self.held(customer, Leg.METER, start=start, end=end), (
                f"meter usage of {customer} in [{start}, {end})"
            )


async def legacy_summaries(client: stripe.StripeClient, item: str) -> list[tuple[int, int, int]]:
    """``(start, end, total_usage)`` of each period Stripe summarises for ``item`` (newest first).

    Stripe's ``period.start`` is exclusive and ``period.end`` inclusive; usage sent in these tests
    never falls on a boundary second, so ``[start, end)`` reads the same.
    """
    response = await client.raw_request_async(
        "get",
        f"/v1/subscription_items/{item}/usage_record_summaries",
        limit=_SUMMARY_LIMIT,
        stripe_version=LEGACY_VERSION,
    )
    body = json.loads(response.body)
    return [
        (int(s["period"]["start"]), int(s["period"]["end"]), int(s["total_usage"]))
        for s in body["data"]
    ]


async def meter_summary(
    client: stripe.StripeClient, meter: str, customer: str, start: int, end: int
) -> int:
    """The meter's aggregated value for ``customer`` over ``[start, end)`` (minute-aligned)."""
    summaries = await client.v1.billing.meters.event_summaries.list_async(
        meter, {"customer": customer, "start_time": start, "end_time": end}
    )
    values = [float(summary.aggregated_value) for summary in summaries.data]
    total = sum(values)
    assert total == int(total), f"a fractional meter total: {values}"
    return int(total)
