"""An independent oracle for end-to-end and fault tests: what each caller was told, held by the test.

The engine's own outcomes say which leg was written and whether a shadow went out; a test that builds
its expectations from them cannot see the engine drop a shadow together with its ledger entry. The
oracle shares nothing with the engine's logic: the test tells it the stage it set for each customer
and what each caller was told (accepted or refused), and the oracle works out from DESIGN.md's stage
table, written out again here on purpose, which legs must hold the usage. It then compares:

* Stripe's own totals, read over HTTP through the official SDK from the stand-in's summary
  endpoints (usage record summaries per billing period, meter event summaries per window), and
* the ledger, row by row (each row's period holds exactly the usage told in it).

Usage the oracle models: ``increment`` and ``set`` on ``sum`` aggregations (a ``set`` replaces the
value at its timestamp on the legacy leg; the meter, which only adds, gets the difference from the
value last set there), and ``increment`` on ``last`` aggregations (a legacy ``last_during_period``
price beside a meter whose formula is ``last``: each leg holds the latest value, by timestamp, of
what it accepted; send one event per timestamp). The ledger counts the meter's difference for a
``set`` on both legs, as DESIGN.md's ledger section says.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import stripe

from dualwrite.ledger import Ledger
from dualwrite.models import Action, Leg, Stage
from tests.support import LEGACY_VERSION, Scenario

__all__ = ["LEGS_AT", "Aggregation", "Oracle", "ShadowFate", "Told"]

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

Aggregation = Literal["sum", "last"]
"""How Stripe sums a customer's usage on both legs: ``sum`` (legacy ``aggregate_usage=sum``, meter
formula ``sum``) or ``last`` (legacy ``last_during_period``, meter formula ``last``)."""

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
    action: Action = "increment"
    effective: int = 0
    """What the ledger counts: the quantity, or for a ``set`` its difference from the value last
    set at that timestamp (worked out by the oracle from what it was told before)."""

    def reached(self, leg: Leg) -> bool:
        """Whether Stripe took this usage on ``leg`` (at this stage, as the test made it answer)."""
        legs = LEGS_AT[self.stage]
        if not self.accepted or leg not in legs:
            return False
        return leg is legs[0] or self.shadow == "accepted"


@dataclass
class Oracle:
    """What callers were told, per customer, leg and instant; and the checks against Stripe and the
    ledger that follow from it."""

    stages: dict[str, Stage] = field(default_factory=dict)
    told: list[Told] = field(default_factory=list)
    aggregations: dict[str, Aggregation] = field(default_factory=dict)
    _last_set: dict[tuple[str, int], int] = field(default_factory=dict)

    def set_stage(
        self, scenario: Scenario, stage: Stage, *, aggregation: Aggregation = "sum"
    ) -> None:
        """Remember the stage the test set for the scenario's customer (before its traffic), and
        how Stripe aggregates its usage."""
        self.stages[scenario.customer] = stage
        self.aggregations[scenario.customer] = aggregation

    def tell(
        self,
        scenario: Scenario,
        quantity: int,
        *,
        timestamp: int,
        accepted: bool,
        shadow: ShadowFate = "accepted",
        action: Action = "increment",
    ) -> None:
        """Record what a caller was told about ``quantity`` units sent at ``timestamp`` (``set``:
        the value at that timestamp)."""
        customer = scenario.customer
        stage = self.stages[customer]
        if action == "set":
            assert self.aggregations[customer] == "sum", "the oracle models set on sum only"
            effective = quantity - self._last_set.get((customer, timestamp), 0)
            if accepted:
                self._last_set[(customer, timestamp)] = quantity
        else:
            effective = quantity
        told = Told(scenario, stage, quantity, timestamp, accepted, shadow, action, effective)
        self.told.append(told)

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
                counts[f"{what}_qty"] += told.effective
        return counts

    def held(
        self, customer: str, leg: Leg, *, start: int | None = None, end: int | None = None
    ) -> int:
        """What Stripe's summary of ``leg`` must read for ``customer`` over ``[start, end)``.

        ``sum``: the legacy leg adds, per timestamp, increments and the last ``set``; the meter adds
        every event's value (a ``set`` arrives as its difference), which comes to the same total
        when every leg took every write. ``last``: the value of the latest event the leg took.
        """
        reached = [t for t in self._of(customer, start, end) if t.reached(leg)]
        if self.aggregations.get(customer, "sum") == "last":
            if not reached:
                return 0
            stamps = [t.timestamp for t in reached]
            assert len(set(stamps)) == len(stamps), f"{customer}: two last-values at one timestamp"
            return max(reached, key=lambda t: t.timestamp).quantity
        if leg is Leg.METER:
            return sum(t.effective for t in reached)
        values: dict[int, int] = {}
        for told in reached:
            before = values.get(told.timestamp, 0)
            values[told.timestamp] = told.quantity + (0 if told.action == "set" else before)
        return sum(values.values())

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
                    sum(t.effective for t in accepted),
                    len(divergent),
                ), f"ledger of {customer} in {row.period}: events, quantity, divergent"
                covered += len(told)
            count = len(list(self._of(customer, None, None)))
            assert covered == count, f"{customer}: ledger periods hold {covered} of {count} events"

    async def assert_stripe(self, client: stripe.StripeClient, *, slack: int = 0) -> None:
        """Stripe's summaries hold, per customer and leg, exactly the usage callers were told was
        accepted: usage record summaries per billing period (legacy), meter event summaries over
        the minutes the usage was sent in (meter).

        ``slack``: seconds the meter window is widened by on each side, for usage the test sent
        without a timestamp (the proxy stamps it a moment after the test noted the time). Each
        customer's usage must then be the only meter usage within ``slack`` of it.
        """
        for customer in self.customers():
            scenario = self._scenario(customer)
            periods = await legacy_summaries(client, scenario.item)
            for start, end, total in periods:
                assert total == self.held(customer, Leg.LEGACY, start=start, end=end), (
                    f"legacy usage of {customer} ({scenario.item}) in [{start}, {end})"
                )
            outside = [
                t.timestamp
                for t in self._of(customer, None, None)
                if t.reached(Leg.LEGACY) and not any(s <= t.timestamp < e for s, e, _ in periods)
            ]
            assert not outside, f"{customer}: legacy usage at {outside} in no period Stripe sums"
            stamps = [t.timestamp for t in self._of(customer, None, None)]
            start = (min(stamps) - slack) // 60 * 60
            end = (max(stamps) + slack) // 60 * 60 + 60
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
