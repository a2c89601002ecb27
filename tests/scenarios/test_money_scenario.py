"""Money, end to end: a month of traffic through dualwrite onto five kinds of price, a cutover at
the period end, and the stand-in's own invoices for the month after it.

Customers on a per-unit, a graduated (flat fees), a volume, a package (``transform_quantity``) and
a decimal legacy metered price, each mapped to the meter-backed twin that ``dualwrite meters apply``
creates, and a sixth customer whose meter leg loses an event
(Stripe refuses it for good). Usage goes through the engine, shadow writes through an outbox
worker, with a few per cent of Stripe's calls failing (500, 429, 409 and replies held past the
client's timeout). Before the period ends ``reconcile --money --preview`` says the five bill the
same on both legs, agreeing with Stripe's preview, and the sixth differs by its exact cents; the
five are cut over at the period end with Stripe's subscription schedule. The stand-in's clock then
runs through the next period: its finalized invoices, priced by its own math on the meter events,
bill what the legacy price would have billed for that month's usage, to the cent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.cutover import CutoverOps
from dualwrite.engine import DualWriteEngine
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.outbox import OutboxWorker
from dualwrite.pricing import Price
from dualwrite.reconcile import Reconciler, ReconciliationRecord
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    cli_environment,
    make_settings,
    record_as_caller,
    refuse_meter_event,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio

DAY = 86_400
SETTLE = 3_600
FLAT_TIERS = [
    {"up_to": 5, "unit_amount": 500, "flat_amount": 1000},
    {"up_to": 10, "unit_amount": 400, "flat_amount": 2000},
    {"up_to": "inf", "unit_amount": 300, "flat_amount": 3000},
]
FONT_TIERS = [
    {"up_to": 5, "unit_amount": 700},
    {"up_to": 10, "unit_amount": 650},
    {"up_to": "inf", "unit_amount": 600},
]
#: The legacy prices, by customer: what each bills (docs.stripe.com/products-prices/pricing-models).
PRICES: dict[str, dict[str, Any]] = {
    "per_unit": {"unit_amount": 3},
    "graduated": {"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": FLAT_TIERS},
    "volume": {"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": FONT_TIERS},
    "package": {"unit_amount": 1000, "transform_quantity": {"divide_by": 60, "round": "up"}},
    "decimal": {"unit_amount_decimal": "0.5"},
    "drifted": {"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": FLAT_TIERS},
}
#: A day's usage, scaled per customer so that totals cross tiers and package boundaries.
SCALE = {"per_unit": 3, "graduated": 1, "volume": 1, "package": 17, "decimal": 5, "drifted": 1}
LOST = 4
"""The value of the drifted customer's meter event that Stripe refuses (its legacy twin lands)."""


@dataclass
class Customer:
    """One customer: its Stripe objects, prices (legacy and meter-backed), and usage sent."""

    name: str
    scenario: Scenario
    legacy: Price
    meter_price: str
    sent: dict[int, int] = field(default_factory=dict)
    """Usage per period start: what the caller asked dualwrite to record."""
    lost: dict[int, int] = field(default_factory=dict)
    """Per period start, the usage whose meter event Stripe refuses (``LOST`` at a time)."""


async def legacy_price(builder: ScenarioBuilder, product: str, name: str) -> Price:
    """The legacy metered price of ``name``, as Stripe returns it (tiers expanded)."""
    client = builder.client
    params: Any = {
        "currency": "usd",
        "product": product,
        "recurring": {"interval": "month", "usage_type": "metered", "aggregate_usage": "sum"},
        **PRICES[name],
    }
    created = await client.v1.prices.create_async(params, {"stripe_version": LEGACY_VERSION})
    read = await client.v1.prices.retrieve_async(
        created.id, {"expand": ["tiers"]}, {"stripe_version": LEGACY_VERSION}
    )
    return Price.from_stripe(read.to_dict())


def meters_apply(config: Path, environment: dict[str, str]) -> dict[str, str]:
    """``dualwrite meters apply``: the meter and each legacy price's meter-backed twin, mapped in
    ``config``; returns the mapping (legacy price → twin)."""
    result = CliRunner().invoke(
        app, ["--config", str(config), "meters", "apply", "--json"], env=environment
    )
    assert result.exit_code == 0, result.output
    [mapping] = Settings.load(config).meters
    assert set(json.loads(result.output)["prices_created"].values()) == set(
        mapping.meter_prices.values()
    )
    return dict(mapping.meter_prices)


@dataclass
class Month:
    """The engine, the stand-in and the customers, on one billing cycle."""

    engine: DualWriteEngine
    standin: StripeStandin
    builder: ScenarioBuilder
    customers: dict[str, Customer]
    end: int
    """The first period's end: the cutover."""

    async def traffic(self, start: int, end: int, stage: str) -> None:
        """Usage every other day of ``[start, end)`` for each customer, recorded as a caller
        retrying with its key does, the shadow legs delivered by a worker after each day."""
        moments = range(start + 600, end - 2 * SETTLE, 2 * DAY)
        for day, moment in enumerate(moments, start=1):
            self.standin.clock.set(moment)
            for customer in self.customers.values():
                quantity = SCALE[customer.name] * ((day + len(stage)) % 7 + 1)
                event = usage(
                    customer.scenario,
                    quantity,
                    identifier=f"{stage}-{customer.name}-{day}",
                    timestamp=moment,
                )
                await record_as_caller(self.engine, event)
                customer.sent[start] = customer.sent.get(start, 0) + quantity
                if customer.name == "drifted" and quantity == LOST:
                    customer.lost[start] = customer.lost.get(start, 0) + quantity
            with anyio.fail_after(30):
                await OutboxWorker(self.engine.outbox, self.engine.writer).drain()

    async def reconcile(self, period: str, *, preview: bool) -> dict[str, ReconciliationRecord]:
        """``reconcile --money`` (``--preview``) of ``period``, by customer name."""
        reconciler = Reconciler.from_settings(
            self.engine.settings,
            stores=self.engine.stores,
            clock=self.standin.clock.now,
            money=True,
            preview=preview,
        )
        try:
            run = await reconciler.run(period)
        finally:
            await reconciler.aclose()
        names = {c.scenario.customer: name for name, c in self.customers.items()}
        return {names[record.customer]: record for record in run.records}


@pytest.fixture
async def month(
    redis_url: str,
    key_prefix: str,
    standin_url: str,
    standin: StripeStandin,
    builder: ScenarioBuilder,
    tmp_path: Path,
    clean_environment: None,
) -> AsyncIterator[Month]:
    """Six customers in shadow on one billing cycle, each on its legacy price mapped by
    ``dualwrite meters apply`` to the meter-backed twin it created."""
    product = await builder.client.v1.products.create_async({"name": "API"})
    legacy = {name: await legacy_price(builder, product.id, name) for name in PRICES}
    config = tmp_path / "dualwrite.toml"
    listed = ", ".join(f'"{price.id}"' for price in legacy.values())
    config.write_text(f'[[meters]]\nevent_name = "{EVENT_NAME}"\nlegacy_prices = [{listed}]\n')
    environment = cli_environment(redis_url, key_prefix, standin_url)
    twins = await anyio.to_thread.run_sync(meters_apply, config, environment)
    [meter] = (await builder.client.v1.billing.meters.list_async()).data
    now = standin.clock.now()
    anchor = now - now % 3600
    customers: dict[str, Customer] = {}
    for name, price in legacy.items():
        twin = twins[price.id]
        scenario = await builder.subscribe(
            name, price.id, anchor=anchor, meter_price=twin, meter=meter.id
        )
        customers[name] = Customer(name, scenario, price, twin)
    settings = make_settings(
        redis_url=redis_url,
        prefix=key_prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        stripe={"timeout": 0.5},
        flags={"cache_ttl": 0},
        reconcile={"settle_seconds": SETTLE, "reads_per_second": 0},
    ).model_copy(update={"meters": Settings.load(config).meters})
    engine = DualWriteEngine.from_settings(settings, clock=standin.clock.now)
    await engine.start(worker=False)
    item = await builder.client.v1.subscription_items.retrieve_async(
        customers["decimal"].scenario.item
    )
    for customer in customers.values():
        await set_stage(engine, customer.scenario.customer, Stage.SHADOW)
    try:
        yield Month(engine, standin, builder, customers, int(item["current_period_end"]))
    finally:
        await engine.aclose()


def faulty(standin: StripeStandin) -> None:
    """A few per cent of the usage writes fail: 500, 429, 409, or a reply held past the timeout."""
    standin.faults.configure(
        rate=0.04,
        kinds=("500", "429", "409", "timeout"),
        paths=("/v1/subscription_items/", "/v1/billing/meter_events"),
        seed=16,
        timeout_seconds=0.7,
    )


async def test_a_month_through_the_cutover_bills_to_the_cent(month: Month) -> None:
    """See the module docstring: reconcile --money before the cutover, then the stand-in's invoices
    for the month after it, against the legacy price on the usage sent."""
    standin, customers = month.standin, month.customers
    anchor = standin.clock.now() - standin.clock.now() % 3600
    drifted = customers["drifted"].scenario.customer
    refuse_meter_event(standin, drifted, LOST)  # the shadow meter write is dead-lettered
    faulty(standin)
    await month.traffic(anchor, month.end, "shadow")
    standin.faults.clear()
    assert standin.faults.injected, "the traffic met no fault"

    # Before the cutover: the five bill the same on both legs, and Stripe's preview agrees.
    [period] = {row.period for row in await month.engine.ledger.rows()}
    before = await month.reconcile(period, preview=True)
    for name, customer in customers.items():
        money = before[name].money
        assert money is not None and money.skipped is None, (name, money)
        expected = customer.legacy.amount(customer.sent[anchor])
        assert money.legacy_amount == expected, name
        if name == "drifted":
            continue
        assert (money.meter_amount, money.difference) == (expected, 0), name
        assert money.preview_agrees is True, (name, money.preview_detail)
    lost = customers["drifted"]
    kept = lost.sent[anchor] - lost.lost[anchor]
    drift = lost.legacy.amount(kept) - lost.legacy.amount(lost.sent[anchor])
    money = before["drifted"].money
    assert money is not None and drift < 0
    assert (money.meter_qty, money.difference) == (kept, drift)

    # The cutover of the five, at the period end, with Stripe's subscription schedule.
    ops = CutoverOps(
        month.engine.redis,
        KeySpace(month.engine.settings.redis.key_prefix),
        month.engine.settings,
        clock=standin.clock.now,
    )
    for name, customer in customers.items():
        if name != "drifted":
            await ops.cutover(
                customer.scenario.customer,
                Stage.PRIMARY,
                at="period-end",
                with_schedule=True,
                price=customer.meter_price,
                actor="tests",
            )

    # The next month, on the meter, then past its end and the invoices' draft hour.
    faulty(standin)
    standin.clock.set(month.end + 1)
    item = await month.builder.client.v1.subscription_items.retrieve_async(
        customers["decimal"].scenario.item
    )
    second_end = int(item["current_period_end"])
    await month.traffic(month.end, second_end, "primary")
    standin.faults.clear()
    standin.clock.set(second_end + SETTLE + 60)
    for name, customer in customers.items():
        if name == "drifted":
            continue
        found = await month.builder.client.v1.invoices.list_async(
            {"customer": customer.scenario.customer}
        )
        after, before_cutover = found.data
        [line] = after["lines"]["data"]
        assert after["status"] == "open" and line["period"]["start"] == month.end
        assert line["pricing"]["price_details"]["price"] == customer.meter_price, name
        assert line["amount"] == customer.legacy.amount(customer.sent[month.end]), name
        [old] = before_cutover["lines"]["data"]
        assert old["pricing"]["price_details"]["price"] == customer.legacy.id
        assert old["amount"] == customer.legacy.amount(customer.sent[anchor]), name

    # Closed and settled, the first period priced from Stripe's own totals says the same.
    closed = await month.reconcile(period, preview=False)
    for name, record in closed.items():
        assert record.money is not None and record.money.basis == "stripe", name
        assert record.money.difference == (drift if name == "drifted" else 0), name
