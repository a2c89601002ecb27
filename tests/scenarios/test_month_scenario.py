"""Three months of migration on Stripe test clocks, as a payments team would run it (issue 21).

48 customers, anchored on the 1st, 15th, 28th, 29th, 30th and 31st, are subscribed on January 1st
(a prorated first period up to their anchor) on Stripe test clocks on the stand-in, three to a clock
as Stripe allows; the test drives the clocks day by day over three months. Usage goes through
``dualwrite serve`` (in-process, on a real socket) from the official SDK, one request per customer
and day, with a few % Stripe faults (the caller retries under the same Idempotency-Key, as the SDKs
do); the proxy's own outbox worker delivers the shadow writes as it runs. The first days are at
``legacy``; then ``rollout shadow`` 25 % then 100 % and ``dualwrite backfill`` for every customer, so
the meter holds those days too; a first wave ``cutover --to primary --at period-end
--with-schedule``; one rollback with its schedule released; a planted divergence; a second wave to
``meter``; the guard at its default settings every day. Customers whose clock dualwrite knows (from
their cutover) send usage at "now", which the engine fixes to the clock's time.

At the end every customer is at its planned stage, no usage was refused, every closed period is
exact on the meter leg and, where the item never moved to its meter-backed price, on the legacy
leg, per the stand-in's summaries; the report and ``reconcile`` agree with those summaries for every
closed period of every customer, on both legs; and the guard rolled back only the planted customer.
"""

from __future__ import annotations

import calendar
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import stripe
from typer.testing import CliRunner

from dualwrite.cli import app
from dualwrite.config import MeterMapping, Settings
from dualwrite.cutover import CutoverOps
from dualwrite.deadletters import DeadLetters
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import StageResolver
from dualwrite.models import Stage, utc_day
from dualwrite.periods import Period
from dualwrite.proxy import RunningProxy, serve_proxy
from dualwrite.reconcile import Reconciler
from dualwrite.report import build_report
from dualwrite.test_clocks import StripeTestClocks
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    cli_environment,
    legacy_summaries,
    meter_summary,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DAY = 86_400
DAYS = 92
ANCHOR_DAYS = (1, 15, 28, 29, 30, 31)
PER_ANCHOR = 8  # 48 customers
PER_CLOCK = 3  # Stripe puts at most three customers on a test clock
FAULT_RATE = 0.03
SHADOW_DAY = 5  # days 0-4 at legacy, then the rollout and the backfill
WAVE1_DAY = 7
ROLLBACK_DAY = 10  # before the rolled-back customer's period end (January 15th)
PLANT_DAY = 20
WAVE2_DAY = 62  # every first-wave period end (February 1st at the latest) is past
CONCURRENCY = 16


def jan(day: int) -> int:
    """Midnight UTC on ``day`` January 2026 (every clock starts on the 1st, before the process
    now)."""
    return calendar.timegm(datetime(2026, 1, day, tzinfo=UTC).timetuple())


@dataclass
class Customer:
    """One customer of the month, and what its callers were told."""

    scenario: Scenario
    clock: str
    anchor_day: int
    told: list[tuple[int, int]] = field(default_factory=list)
    """(timestamp, quantity) of every usage record the proxy accepted."""

    @property
    def id(self) -> str:
        """The Stripe customer id."""
        return self.scenario.customer


class Month:
    """The customers, their clocks, and the scenario's day."""

    def __init__(self, builder: ScenarioBuilder) -> None:
        self.builder = builder
        self.customers: list[Customer] = []
        self.day = 0
        self.retried = 0
        """Usage requests the caller had to send again (a fault: 500, 429)."""

    def now(self) -> float:
        """The scenario's time: every clock's frozen time (the operations judge by it)."""
        return float(jan(1) + self.day * DAY)

    async def subscribe(self) -> None:
        """``PER_ANCHOR`` customers per anchor day, three to a test clock frozen at January 1st,
        each subscribed then with its billing cycle anchored on its day."""
        legacy, metered, meter = await self.builder._catalog()
        client = self.builder.client
        clock = ""
        for anchor_day in ANCHOR_DAYS:
            for index in range(PER_ANCHOR):
                if len(self.customers) % PER_CLOCK == 0:
                    made = await client.v1.test_helpers.test_clocks.create_async(
                        {"frozen_time": jan(1)}
                    )
                    clock = made.id
                customer = await client.v1.customers.create_async(
                    {"name": f"anchor {anchor_day} #{index}", "test_clock": clock}
                )
                params: dict[str, Any] = {"customer": customer.id, "items": [{"price": legacy}]}
                if anchor_day != 1:
                    params["billing_cycle_anchor"] = jan(anchor_day)
                sub = await client.v1.subscriptions.create_async(
                    params,  # type: ignore[arg-type]
                    {"stripe_version": LEGACY_VERSION},
                )
                item = sub["items"]["data"][0]["id"]
                scenario = Scenario(customer.id, sub.id, item, legacy, metered, meter)
                self.customers.append(Customer(scenario, clock, anchor_day))

    def clocks(self) -> list[str]:
        """Every test clock, once."""
        return list(dict.fromkeys(customer.clock for customer in self.customers))

    async def advance(self) -> None:
        """One day forward on every clock."""
        self.day += 1
        clocks = self.builder.client.v1.test_helpers.test_clocks
        for clock in self.clocks():
            await clocks.advance_async(clock, {"frozen_time": int(self.now())})
        for clock in self.clocks():
            await clocks.retrieve_async(clock)  # the advance is done


async def send(
    sdk: stripe.StripeClient, month: Month, customer: Customer, quantity: int, *, at_now: bool
) -> None:
    """One usage record through the proxy, under one Idempotency-Key, sent again on a retryable
    failure (as an SDK retries a 500 or a 429) until accepted; a refusal fails the test.
    ``at_now``: no timestamp (the engine fixes "now"), else the clock's time."""
    params: dict[str, Any] = {"quantity": quantity}
    if not at_now:
        params["timestamp"] = int(month.now())
    key = f"month-{customer.id}-{month.day}"
    for _ in range(50):
        try:
            response = await sdk.raw_request_async(
                "post",
                f"/v1/subscription_items/{customer.scenario.item}/usage_records",
                stripe_version=LEGACY_VERSION,
                idempotency_key=key,
                **params,
            )
        except (stripe.APIError, stripe.RateLimitError, stripe.APIConnectionError):
            month.retried += 1
            continue
        except stripe.StripeError as exc:
            pytest.fail(f"usage of {customer.id} on day {month.day} refused: {exc}")
        record = json.loads(response.body)
        assert record["timestamp"] == int(month.now()), (customer.id, month.day, record)
        customer.told.append((record["timestamp"], quantity))
        return
    pytest.fail(f"usage of {customer.id} on day {month.day} never accepted")


async def one_day(
    sdk: stripe.StripeClient, month: Month, quantities: dict[str, int], at_now: set[str]
) -> None:
    """Every customer's usage of the day, ``CONCURRENCY`` requests at a time."""
    slots = anyio.Semaphore(CONCURRENCY)

    async def one(customer: Customer) -> None:
        async with slots:
            quantity = quantities[customer.id]
            await send(sdk, month, customer, quantity, at_now=customer.id in at_now)

    async with anyio.create_task_group() as group:
        for customer in month.customers:
            group.start_soon(one, customer)


async def settled(engine: DualWriteEngine) -> None:
    """Wait until the proxy's worker has settled every shadow write (nothing ready, pending or
    waiting out a backoff)."""
    with anyio.fail_after(120):
        while True:
            depth = await engine.outbox.depth()
            if depth.outstanding == 0 and depth.pending == 0:
                return
            await anyio.sleep(0.05)


@pytest.fixture
def proxy_of() -> Iterator[Any]:
    """Starts ``dualwrite serve`` in-process (its outbox worker running) for given settings."""
    stack: list[Any] = []

    def start(settings: Settings) -> RunningProxy:
        context = serve_proxy(settings)
        running = context.__enter__()
        stack.append(context)
        return running

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def backfill(env: dict[str, str], config: Path, customer: str) -> dict[str, Any]:
    """``dualwrite --config FILE backfill --customer ID --json``; its JSON result."""
    result = CliRunner().invoke(
        app, ["--config", str(config), "backfill", "--customer", customer, "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = json.loads(result.output)
    return found


async def test_three_months_on_test_clocks(
    standin_settings: SettingsFactory,
    builder: ScenarioBuilder,
    standin: StripeStandin,
    proxy_of: Any,
    redis_url: str,
    key_prefix: str,
    standin_url: str,
    tmp_path: Path,
    clean_environment: None,
) -> None:
    """Every customer ends at its planned stage, nothing refused, every closed period exact, the
    report and reconcile agree with Stripe's summaries, and the guard rolls back only the
    customer with a planted divergence."""
    started = time.monotonic()
    month = Month(builder)
    await month.subscribe()
    legacy_price = month.customers[0].scenario.legacy_price
    settings = standin_settings().model_copy(
        update={"meters": (MeterMapping(event_name=EVENT_NAME, legacy_prices=(legacy_price,)),)}
    )
    config = tmp_path / "dualwrite.toml"
    config.write_text(
        f'[[meters]]\nevent_name = "{EVENT_NAME}"\nlegacy_prices = ["{legacy_price}"]\n'
    )
    env = cli_environment(redis_url, key_prefix, standin_url)
    customers = month.customers
    planted = customers[1]  # anchored on the 1st
    rolled_back = customers[PER_ANCHOR]  # the first on the 15th
    wave1 = [c for c in customers if c not in (planted, rolled_back)][::2]
    wave1.append(rolled_back)
    wave2 = [c for c in wave1 if c is not rolled_back]
    moved = {c.id for c in wave2}  # their items move to the meter-backed price

    proxy = proxy_of(settings)
    assert proxy.app is not None
    proxy_resolver = proxy.app.engine.resolver
    assert isinstance(proxy_resolver, StageResolver)
    assert isinstance(proxy_resolver.test_clocks, StripeTestClocks)
    control = DualWriteEngine.from_settings(settings)
    await control.start(worker=False)
    ops = CutoverOps(control.redis, control.keys, settings, clock=month.now)
    http = stripe.HTTPXClient()
    sdk = stripe.StripeClient(
        STRIPE_KEY, base_addresses={"api": proxy.url}, http_client=http, max_network_retries=0
    )
    rng = random.Random(21)
    trips: list[str] = []
    price_moves: dict[str, int] = {}
    backfilled = 0
    try:
        for day in range(DAYS):
            # The test moves the clocks faster than their readings are kept (5 s).
            proxy_resolver.test_clocks.forget()
            proxy_resolver.invalidate()
            ops.test_clocks.forget()
            if day == SHADOW_DAY:
                await ops.rollout(Stage.SHADOW, percent=25, actor="ann")
                await ops.rollout(Stage.SHADOW, percent=100, actor="ann")
                for customer in customers:
                    result = await anyio.to_thread.run_sync(backfill, env, config, customer.id)
                    assert result["counts"]["sent"] == 1, result
                    backfilled += sum(e["quantity"] for e in result["events"])
            if day == WAVE1_DAY:
                for customer in wave1:
                    done = await ops.cutover(
                        customer.id,
                        Stage.PRIMARY,
                        at="period-end",
                        with_schedule=True,
                        price=customer.scenario.meter_price,
                        actor="ann",
                    )
                    (end,) = [c.at for c in done.changes if c.new == "primary"]
                    assert end is not None
                    price_moves[customer.id] = end
            if day == ROLLBACK_DAY:
                rollback = await ops.rollback(
                    [rolled_back.id], to=Stage.SHADOW, actor="ann", reason="not this one"
                )
                assert any("released Stripe schedule" in note for note in rollback.notes)
            if day == PLANT_DAY:
                standin.faults.refuse(
                    path="/v1/billing/meter_events",
                    where={"payload[stripe_customer_id]": planted.id},
                    code="parameter_invalid",
                )
            if day == WAVE2_DAY:
                for customer in wave2:
                    assert (await ops.stage_of(customer.id))[0] is Stage.PRIMARY
                    await ops.cutover(customer.id, Stage.METER, at="period-end", actor="ann")
            standin.faults.configure(rate=FAULT_RATE, kinds=["500", "429"], seed=day)
            # The engine knows a customer's clock once its cutover recorded it: "now" for those.
            at_now = {c.id for c in wave1} if day >= WAVE1_DAY else set()
            await one_day(sdk, month, {c.id: rng.randint(1, 9) for c in customers}, at_now)
            await settled(control)
            standin.faults.configure(rate=0.0, kinds=["500"])
            guard = await ops.guard_once()
            trips += [trip.customer for trip in guard.tripped]
            assert not guard.global_tripped, guard
            await month.advance()
        elapsed = time.monotonic() - started

        assert trips == [planted.id]
        # Dead letters are the planted customer's refused meter events only: the legacy writes
        # retired after the price moves are no failures (counted apart).
        letters = DeadLetters(control.redis, control.keys)
        dead = await letters.find(limit=10_000)
        assert dead and {letter.entry.event.customer for letter in dead if letter.entry} == {
            planted.id
        }
        assert (await control.outbox.depth()).dead == len(dead)
        retired = (await letters.counts()).get("retired", 0)
        assert retired > 0
        planned = {c.id: Stage.SHADOW for c in customers}
        planned |= {c.id: Stage.METER for c in wave2}
        planned[planted.id] = Stage.LEGACY
        for customer in customers:
            assert (await ops.stage_of(customer.id))[0] is planned[customer.id], customer.id

        # Every closed period of every customer: Stripe's summaries, the report and reconcile.
        reconciler = Reconciler.from_settings(
            settings, stores=control.stores, settle_seconds=0, clock=month.now
        )
        checked = 0
        by_period: dict[str, list[Customer]] = {}
        stripe_totals: dict[tuple[str, str], tuple[int, float]] = {}
        for customer in customers:
            scenario = customer.scenario
            legacy_by_period = await legacy_summaries(builder.client, scenario.item)
            rows = await control.ledger.rows(customer=customer.id)
            periods = sorted({Period.parse(row.period) for row in rows}, key=lambda p: p.start)
            closed = [p for p in periods if p.end <= month.now()]
            assert len(closed) >= 3, (customer.id, periods)
            for period in closed:
                intended = sum(q for ts, q in customer.told if period.start <= ts < period.end)
                legacy = legacy_by_period.get((period.start, period.end), 0)
                meter = await meter_summary(
                    builder.client, scenario.meter, customer.id, period.start, period.end
                )
                if customer is not planted or period.end <= jan(1) + PLANT_DAY * DAY:
                    assert meter == intended, (customer.id, period.id, meter, intended)
                if customer.id not in moved or period.end <= price_moves[customer.id]:
                    assert legacy == intended, (customer.id, period.id, legacy, intended)
                middle = utc_day(period.start + (period.end - period.start) // 2)
                report = await build_report(
                    control.ledger,
                    control.resolver,
                    customer=customer.id,
                    since=middle,
                    until=middle,
                    now=month.now(),
                )
                (line,) = report.customers
                assert (line.legacy.accepted_qty, line.meter.accepted_qty) == (legacy, meter), (
                    customer.id,
                    period.id,
                )
                by_period.setdefault(period.id, []).append(customer)
                stripe_totals[(customer.id, period.id)] = (legacy, meter)
                checked += 1
        reconciled = 0
        try:
            for period_id, found in sorted(by_period.items()):
                run = await reconciler.run(period_id, customers=[c.id for c in found])
                for record in run.records:
                    legacy, meter = stripe_totals[(record.customer, record.period)]
                    where = (record.customer, record.period)
                    assert record.meter.compared and record.meter.stripe_qty == meter, where
                    assert not record.meter.drifted, (where, record.meter)
                    if record.customer not in moved:
                        assert record.legacy.compared, (where, record.legacy)
                    if record.legacy.compared:
                        assert record.legacy.stripe_qty == legacy, (where, record.legacy)
                        assert not record.legacy.drifted, (where, record.legacy)
                    reconciled += 1
        finally:
            await reconciler.aclose()
        assert reconciled == checked
        print(
            f"\n{len(customers)} customers, {DAYS} days: {elapsed:.1f} s; "
            f"{sum(len(c.told) for c in customers)} usage requests accepted, {month.retried} "
            f"sent again after a fault, 0 refused; {backfilled} units backfilled; {retired} "
            f"legacy writes retired; {len(dead)} dead letters; {checked} "
            "closed periods checked against Stripe, the report and reconcile"
        )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
        await control.aclose()
