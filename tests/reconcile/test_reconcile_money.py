"""``reconcile --money``: each leg's total priced by its Stripe price, to the cent, through a real
engine (real Redis, the stand-in over HTTP, the SDK).

The prices here bill half a cent a unit (``unit_amount_decimal=0.5``), so that every amount goes
through Stripe's rounding (a half up: docs.stripe.com/billing/subscriptions/usage-based/
manage-billing-setup#decimal-amounts). Tiered and transformed prices are tests/pricing/test_pricing.py's
table (which the stand-in's own math passes too) and tests/scenarios/test_money_scenario.py's customers.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import SecretStr
from rich.console import Console
from typer.testing import CliRunner, Result

from dualwrite.admin import admin_app
from dualwrite.cli import app
from dualwrite.config import MeterMapping, ReportSettings, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.outbox import OutboxWorker
from dualwrite.periods import Period
from dualwrite.reconcile import (
    MoneyCheck,
    Reconciler,
    ReconciliationRecord,
    ReconciliationRun,
    read_reconciliation,
)
from dualwrite.report import CustomerMoney, Report, build_report, render_csv, render_table
from dualwrite.stripe_io import preview_from, swap_params
from dualwrite.testing import StripeStandin, meter_params
from dualwrite.web import report_app
from tests.conftest import STRIPE_KEY
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    cli_environment,
    make_settings,
    set_stage,
    usage,
)

pytestmark = pytest.mark.anyio

SETTLE = 3600
REPORT_TOKEN = "report-token-for-money-tests-0123"
ADMIN_TOKEN = "admin-token-for-money-tests-01234"
#: Usage per customer: a records 3 + 4, b 5, c 2 + 6.
QUANTITIES = {"a": (3, 4), "b": (5,), "c": (2, 6)}


def half_cents(units: int) -> int:
    """What half a cent a unit bills, rounded as Stripe does (a half up), by hand."""
    return (units + 1) // 2


@dataclass
class Catalog:
    """The meter, and the prices of the test: legacy, meter-backed, and others."""

    meter: str
    product: str
    legacy: str
    metered: str


@dataclass
class Shop:
    """Three shadow customers on the legacy price, their usage delivered on both legs."""

    engine: DualWriteEngine
    standin: StripeStandin
    builder: ScenarioBuilder
    catalog: Catalog
    scenarios: dict[str, Scenario]

    def customer(self, name: str) -> str:
        return self.scenarios[name].customer

    async def period(self) -> Period:
        rows = await self.engine.ledger.rows()
        [period] = {row.period for row in rows}
        return Period.parse(period)

    async def close(self) -> Period:
        """Move Stripe's clock past the period's end and the settling time."""
        period = await self.period()
        self.standin.clock.advance(period.end - self.standin.clock.now() + SETTLE + 60)
        return period

    async def reconcile(self, period: str, *, settings: Settings | None = None, **options: Any):
        reconciler = Reconciler.from_settings(
            settings or self.engine.settings,
            stores=self.engine.stores,
            clock=self.standin.clock.now,
            money=True,
            **options,
        )
        try:
            return await reconciler.run(period)
        finally:
            await reconciler.aclose()

    def mapped(self, meter_price: str) -> Settings:
        """The engine's settings with the legacy price mapped to ``meter_price``."""
        mapping = MeterMapping(
            event_name=EVENT_NAME, meter_prices={self.catalog.legacy: meter_price}
        )
        return self.engine.settings.model_copy(update={"meters": (mapping,)})


async def create_catalog(
    builder: ScenarioBuilder, *, aggregate: str = "sum", formula: str = "sum"
) -> Catalog:
    """A meter (``formula``), a product, a legacy metered price (``aggregate``) and its
    meter-backed twin, both at 0.5 cent a unit."""
    client = builder.client
    params: Any = meter_params(EVENT_NAME) | {"default_aggregation": {"formula": formula}}
    meter = await client.v1.billing.meters.create_async(params)
    product = await client.v1.products.create_async({"name": "API"})
    # Typed Any: aggregate_usage is gone from stripe-python's typed parameters.
    recurring = {"interval": "month", "usage_type": "metered", "aggregate_usage": aggregate}
    params = {
        "currency": "usd",
        "product": product.id,
        "unit_amount_decimal": "0.5",
        "recurring": recurring,
    }
    legacy = await client.v1.prices.create_async(params, {"stripe_version": LEGACY_VERSION})
    metered = await meter_price(builder, product.id, meter.id, "0.5")
    return Catalog(meter.id, product.id, legacy.id, metered)


async def meter_price(
    builder: ScenarioBuilder, product: str, meter: str, amount: str, currency: str = "usd"
) -> str:
    """A meter-backed price of ``amount`` cents (a decimal string) a unit."""
    params: Any = {  # the SDK types unit_amount_decimal as Decimal; Stripe takes the string
        "currency": currency,
        "product": product,
        "unit_amount_decimal": amount,
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
    }
    created = await builder.client.v1.prices.create_async(params)
    return created.id


async def subscribe(builder: ScenarioBuilder, catalog: Catalog, name: str, anchor: int) -> Scenario:
    """A customer on the legacy price, its periods starting at ``anchor``."""
    return await builder.subscribe(
        name, catalog.legacy, anchor=anchor, meter_price=catalog.metered, meter=catalog.meter
    )


async def open_shop(
    urls: tuple[str, str, str],
    standin: StripeStandin,
    builder: ScenarioBuilder,
    catalog: Catalog,
    quantities: dict[str, tuple[int, ...]],
) -> Shop:
    """An engine on ``urls`` (Redis, key prefix, stand-in) mapping the catalog's legacy price to
    its twin, and one shadow customer per name with its usage recorded (one second apart) and
    delivered on both legs."""
    redis_url, key_prefix, standin_url = urls
    mapping = MeterMapping(event_name=EVENT_NAME, meter_prices={catalog.legacy: catalog.metered})
    settings = make_settings(
        redis_url=redis_url,
        prefix=key_prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        reconcile={"settle_seconds": SETTLE, "reads_per_second": 0},
    ).model_copy(update={"meters": (mapping,)})
    engine = DualWriteEngine.from_settings(settings)
    await engine.start(worker=False)
    now = standin.clock.now()
    anchor = now - now % 3600
    scenarios = {name: await subscribe(builder, catalog, name, anchor) for name in quantities}
    standin.clock.advance(len(max(quantities.values(), key=len)))
    for name, values in quantities.items():
        await set_stage(engine, scenarios[name].customer, Stage.SHADOW)
        for second, quantity in enumerate(values):
            event = usage(scenarios[name], quantity, timestamp=now + second)
            assert (await engine.record(event)).accepted
    with anyio.fail_after(20):
        await OutboxWorker(engine.outbox, engine.writer).drain()
    return Shop(engine, standin, builder, catalog, scenarios)


@pytest.fixture
async def shop(
    redis_url: str, key_prefix: str, standin_url: str, standin: StripeStandin, builder
) -> AsyncIterator[Shop]:
    """Customers a, b, c in shadow on the legacy price (mapped to its twin), usage delivered."""
    urls = (redis_url, key_prefix, standin_url)
    opened = await open_shop(urls, standin, builder, await create_catalog(builder), QUANTITIES)
    yield opened
    await opened.engine.aclose()


def by_customer(run: ReconciliationRun) -> dict[str, ReconciliationRecord]:
    """One record per customer."""
    return {record.customer: record for record in run.records}


def money_of(record: ReconciliationRecord) -> MoneyCheck:
    """The record's money check (the run priced every record)."""
    assert record.money is not None
    return record.money


async def extra_meter_event(shop: Shop, name: str, value: int, timestamp: int) -> None:
    """A meter event sent straight to Stripe, past dualwrite (drift on the meter leg)."""
    await shop.builder.meter_event(shop.customer(name), value, timestamp)


class TestMoney:
    """Each leg's total priced by its price; the difference in cents."""

    async def test_closed_period_bills_the_same(self, shop: Shop):
        """Closed and settled: Stripe's totals on each leg, priced, bill the same to the cent
        (a: 7 units at 0.5 cent is 3.5, so 4 cents on each leg)."""
        period = await shop.close()
        run = await shop.reconcile(period.id)
        records = by_customer(run)
        for name, quantities in QUANTITIES.items():
            money = money_of(records[shop.customer(name)])
            assert money.skipped is None, money.detail
            assert money.basis == "stripe" and money.currency == "usd"
            assert (money.legacy_price, money.meter_price) == (
                shop.catalog.legacy,
                shop.catalog.metered,
            )
            cents = half_cents(sum(quantities))
            assert (money.legacy_amount, money.meter_amount, money.difference) == (cents, cents, 0)
            assert not money.differs()
        assert run.money_differs() == []
        stored = await read_reconciliation(shop.engine.redis, shop.engine.keys)
        assert stored == run.records

    async def test_planted_divergence_shows_as_its_cents(self, shop: Shop):
        """11 units sent to b's meter past dualwrite: b's meter leg bills 16 units (8 cents)
        against the legacy leg's 5 (2.5, so 3 cents): +5 cents, and the run says so."""
        period = await shop.period()
        await extra_meter_event(shop, "b", 11, timestamp=period.start + 120)
        await shop.close()
        run = await shop.reconcile(period.id)
        money = money_of(by_customer(run)[shop.customer("b")])
        assert (money.legacy_qty, money.meter_qty) == (5, 16)
        assert (money.legacy_amount, money.meter_amount, money.difference) == (3, 8, 5)
        assert money.differs() and not money.differs(tolerance=5)
        assert [record.customer for record in run.money_differs()] == [shop.customer("b")]
        assert money.describe() == "legacy 0.03 USD, meter 0.08 USD, difference +0.05 USD"

    async def test_open_period_prices_the_ledger(self, shop: Shop):
        """While the period runs, the ledger's accepted totals are priced (sum price, sum meter)."""
        period = await shop.period()
        run = await shop.reconcile(period.id)
        money = money_of(by_customer(run)[shop.customer("c")])
        assert money.basis == "ledger" and money.skipped is None
        assert (money.legacy_amount, money.meter_amount) == (half_cents(8), half_cents(8))

    async def test_a_single_leg_is_not_priced(self, shop: Shop):
        """A customer at legacy (no meter events written): nothing to compare, not a difference."""
        period = await shop.period()
        alone = await subscribe(shop.builder, shop.catalog, "alone", period.start)
        assert (await shop.engine.record(usage(alone, 4))).accepted
        await shop.close()
        run = await shop.reconcile(period.id)
        money = money_of(by_customer(run)[alone.customer])
        assert money.skipped == "one_leg" and "only the legacy leg" in money.detail
        assert not run.money_differs()

    async def test_last_values_are_priced_from_stripe(
        self, redis_url: str, key_prefix: str, standin_url: str, standin: StripeStandin, builder
    ):
        """A last_during_period legacy price and its twin on a last meter: Stripe's own totals
        (the last value, 9, on each leg) are priced, 4.5 so 5 cents each, though neither leg
        compares with the ledger's sum (12)."""
        catalog = await create_catalog(builder, aggregate="last_during_period", formula="last")
        urls = (redis_url, key_prefix, standin_url)
        shop = await open_shop(urls, standin, builder, catalog, {"d": (3, 9)})
        try:
            period = await shop.close()
            [record] = (await shop.reconcile(period.id)).records
            page = await customer_page(shop, shop.customer("d"))
        finally:
            await shop.engine.aclose()
        # The page shows why the legs were not compared, not a drift of 0 beside Stripe's 9.
        [row] = re.findall(r"<tr data-recon-period=.*?</tr>", page, re.S)
        assert row.count("not_comparable") == 2 and ">9<" not in row and "0.05 USD" in row
        for leg in (record.legacy, record.meter):
            assert leg.skipped == "not_comparable" and leg.stripe_qty == 9 and leg.drift is None
        money = money_of(record)
        assert (money.basis, money.legacy_qty, money.meter_qty) == ("stripe", 9, 9)
        assert (money.legacy_amount, money.meter_amount, money.difference) == (5, 5, 0)

    async def test_prices_are_read_once_per_run(self, shop: Shop):
        """Three customers on one pair of prices: two price reads, each with its tiers expanded,
        at the pinned legacy version (aggregate_usage)."""
        period = await shop.close()
        shop.standin.reset_requests()
        await shop.reconcile(period.id)
        reads = [r for r in shop.standin.requests if r.path.startswith("/v1/prices/")]
        assert sorted(r.path for r in reads) == sorted(
            f"/v1/prices/{price}" for price in (shop.catalog.legacy, shop.catalog.metered)
        )
        assert all(r.stripe_version == LEGACY_VERSION for r in reads)
        assert all(r.flat_params.get("expand[0]") == "tiers" for r in reads)

    async def test_unmapped_price_says_how_to_map_it(self, shop: Shop):
        """No meter-backed price mapped to the legacy one: not priced, and the detail says what to
        write in [[meters]]; no price is read."""
        period = await shop.close()
        settings = shop.engine.settings.model_copy(
            update={"meters": (MeterMapping(event_name=EVENT_NAME),)}
        )
        run = await shop.reconcile(period.id, settings=settings)
        money = money_of(run.records[0])
        assert money.skipped == "no_meter_price" and money.legacy_price == shop.catalog.legacy
        assert f"meter_prices = {{ {shop.catalog.legacy} = " in money.detail
        assert "meters apply" in money.detail
        assert not run.money_differs()

    async def test_other_currency_is_never_the_same_invoice(self, shop: Shop):
        """A meter-backed price in EUR: the legs are not priced against each other, and the
        record counts as billing differently."""
        period = await shop.close()
        eur = await meter_price(
            shop.builder, shop.catalog.product, shop.catalog.meter, "0.5", "eur"
        )
        run = await shop.reconcile(period.id, settings=shop.mapped(eur))
        money = money_of(run.records[0])
        assert money.skipped == "currency_differs" and "EUR" in money.detail
        assert money.differs() and len(run.money_differs()) == 3

    async def test_dearer_meter_price_differs_by_the_price(self, shop: Shop):
        """A meter-backed price of 0.6 cent a unit: a's 7 units bill 4.2, so 4 cents, on the meter
        and 3.5, so 4, on legacy (0 cents apart); c's 8 units bill 4.8, so 5, against 4: +1."""
        period = await shop.close()
        dearer = await meter_price(shop.builder, shop.catalog.product, shop.catalog.meter, "0.6")
        records = by_customer(await shop.reconcile(period.id, settings=shop.mapped(dearer)))
        a, c = (money_of(records[shop.customer(name)]) for name in "ac")
        assert (a.legacy_amount, a.meter_amount, a.difference) == (4, 4, 0)
        assert (c.legacy_amount, c.meter_amount, c.difference) == (4, 5, 1)
        assert "unit_amount '0.6' (not '0.5')" in c.detail

    async def test_refused_price_read_is_recorded(self, shop: Shop):
        """Stripe refusing a price read is the record's money skip; the legs are still compared."""
        period = await shop.close()
        shop.standin.faults.refuse(
            path=rf"/v1/prices/{shop.catalog.metered}",
            status=403,
            code="secret_key_required",
            message="refused by the test",
        )
        run = await shop.reconcile(period.id)
        for record in run.records:
            money = money_of(record)
            assert money.skipped == "stripe_error" and "403 secret_key_required" in money.detail
            assert record.legacy.compared and record.meter.compared

    async def test_preview_agrees_with_stripe(self, shop: Shop):
        """--preview on a running period asks Stripe (the stand-in, with its own price math) for
        the invoice as it stands and with the item swapped to the meter-backed price: both bill
        what dualwrite computed (a: 7 units, 4 cents on each leg), at the pinned legacy version;
        b, with 11 units sent past dualwrite to its meter, previews the swap at 8 cents."""
        period = await shop.period()
        await extra_meter_event(shop, "b", 11, timestamp=period.start + 120)
        run = await shop.reconcile(period.id, preview=True)
        records = by_customer(run)
        a = money_of(records[shop.customer("a")])
        assert a.skipped is None and a.preview_detail == ""
        assert (a.preview_legacy_amount, a.preview_meter_amount) == (half_cents(7), half_cents(7))
        assert a.preview_agrees is True
        b = money_of(records[shop.customer("b")])
        assert (b.preview_legacy_amount, b.preview_meter_amount) == (half_cents(5), half_cents(16))
        # The ledger's meter leg holds 5 (the event past dualwrite is Stripe's only): the preview
        # shows what dualwrite's running totals cannot see yet.
        assert b.preview_agrees is False
        previews = [r for r in shop.standin.requests if r.path == "/v1/invoices/create_preview"]
        assert {(r.method, r.stripe_version) for r in previews} == {("POST", LEGACY_VERSION)}
        swaps = [
            r.flat_params for r in previews if "subscription_details[items][0][id]" in r.flat_params
        ]
        assert swaps and all(p["subscription_details[proration_behavior]"] == "none" for p in swaps)

    async def test_preview_refused_by_stripe_is_noted(self, shop: Shop):
        """A preview Stripe refuses (here by the stand-in's fault injection) is noted on the
        record and changes nothing else."""
        period = await shop.period()
        shop.standin.faults.refuse(
            path=r"/v1/invoices/create_preview",
            status=400,
            code="invoice_upcoming_none",
            message="refused by the test",
        )
        run = await shop.reconcile(period.id, preview=True)
        money = money_of(by_customer(run)[shop.customer("a")])
        assert money.skipped is None and money.legacy_amount == half_cents(7)
        assert money.preview_detail.startswith("Stripe refused the preview: POST")
        assert "/v1/invoices/create_preview" in money.preview_detail
        assert "invoice_upcoming_none" in money.preview_detail
        assert money.preview_agrees is None

    async def test_preview_of_a_closed_period_is_not_asked(self, shop: Shop):
        """A closed period has no preview (Stripe previews the next invoice): none is asked for."""
        period = await shop.close()
        shop.standin.reset_requests()
        run = await shop.reconcile(period.id, preview=True)
        assert "only a running period" in money_of(run.records[0]).preview_detail
        assert not [r for r in shop.standin.requests if "create_preview" in r.path]


def test_preview_lines_in_both_shapes():
    """A preview's lines name their item and price before basil (fields of their own) and from
    basil on (parent and pricing); amounts are summed per item and price."""
    data = {
        "currency": "usd",
        "subtotal": 1300,
        "lines": {
            "has_more": False,
            "data": [
                {
                    "amount": 1000,
                    "subscription_item": "si_1",
                    "price": {"id": "price_legacy", "object": "price"},
                    "quantity": 10,
                    "period": {"start": 1, "end": 2},
                },
                {
                    "amount": 300,
                    "parent": {"subscription_item_details": {"subscription_item": "si_2"}},
                    "pricing": {"price_details": {"price": "price_meter"}},
                },
            ],
        },
    }
    preview = preview_from(data)
    assert preview.amount_for("si_1") == 1000 and preview.amount_for("si_1", price="x") is None
    assert preview.amount_for("si_2", price="price_meter") == 300
    assert preview.complete and preview.lines[0].quantity == 10


def test_swap_params():
    """A price swap is each item with its new price, and no prorations."""
    assert swap_params({"si_1": "price_meter"}) == {
        "items": [{"id": "si_1", "price": "price_meter"}],
        "proration_behavior": "none",
    }


# ----------------------------------------------------------------------------------------- CLI


def test_command_prints_amounts_and_exits_1_on_a_difference(
    redis_url: str,
    key_prefix: str,
    standin_url: str,
    standin: StripeStandin,
    clean_environment: None,
    tmp_path: Path,
):
    """`reconcile --money`: the table has each leg's amount and the difference in cents; exit 1
    when they differ (0 without --money); --json carries the money of every record."""

    async def setup() -> tuple[str, str, str]:
        async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
            catalog = await create_catalog(builder)
            dearer = await meter_price(builder, catalog.product, catalog.meter, "1")
            settings = make_settings(
                redis_url=redis_url, prefix=key_prefix, api_base=standin_url, api_key=STRIPE_KEY
            )
            engine = DualWriteEngine.from_settings(settings)
            await engine.start(worker=False)
            try:
                scenario = await subscribe(builder, catalog, "cli", standin.clock.now())
                await set_stage(engine, scenario.customer, Stage.SHADOW)
                assert (await engine.record(usage(scenario, 9))).accepted
                await OutboxWorker(engine.outbox, engine.writer).drain()
                [row] = await engine.ledger.rows()
                return row.period, catalog.legacy, dearer
            finally:
                await engine.aclose()

    period, legacy, dearer = anyio.run(setup)
    standin.clock.advance(Period.parse(period).end - standin.clock.now() + SETTLE + 60)
    config = tmp_path / "dualwrite.toml"
    config.write_text(
        f'[[meters]]\nevent_name = "{EVENT_NAME}"\nmeter_prices = {{ {legacy} = "{dearer}" }}\n'
    )
    environment = cli_environment(
        redis_url, key_prefix, standin_url, DUALWRITE_RECONCILE__READS_PER_SECOND="0"
    )
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(
            app, ["--config", str(config), "reconcile", "--period", period, *args], env=environment
        )

    result = invoke("--money")
    assert result.exit_code == 1, result.output
    # 9 units: 4.5, so 5 cents on legacy; 9 cents on the 1-cent meter price.
    assert "0.05 USD" in result.output and "0.09 USD" in result.output
    assert "+0.04 USD" in result.output and "1 billing differently" in result.output
    [record] = json.loads(invoke("--money", "--json").stdout)["records"]
    assert record["money"]["legacy_amount"] == 5 and record["money"]["meter_amount"] == 9
    result = invoke()
    # Without --money the running period's legs are not compared (Stripe's summaries lag): "nothing
    # was compared", exit 4, never a clean "no drift".
    assert result.exit_code == 4 and "billing differently" not in result.output
    assert "nothing was compared" in " ".join(result.output.split())


# --------------------------------------------------------------------- report, readiness, page


async def planted_divergence(shop: Shop) -> Period:
    """b's meter leg holds 11 units more than its legacy leg (+5 cents); the period closed and
    reconciled with --money."""
    period = await shop.period()
    await extra_meter_event(shop, "b", 11, timestamp=period.start + 120)
    await shop.close()
    run = await shop.reconcile(period.id)
    assert [record.customer for record in run.money_differs()] == [shop.customer("b")]
    return period


async def report_of(shop: Shop, **settings: Any) -> Report:
    """The report as of Stripe's clock (the period is closed there), with ``settings`` over the
    default readiness rule."""
    return await build_report(
        shop.engine.ledger,
        shop.engine.resolver,
        settings=ReportSettings(**settings),
        now=shop.standin.clock.now(),
    )


async def customer_page(shop: Shop, customer: str) -> str:
    """The report page of ``customer``, through the engine's own Redis."""
    settings = shop.engine.settings.model_copy(update={"report_token": SecretStr(REPORT_TOKEN)})
    transport = httpx.ASGITransport(app=report_app(settings, engine=shop.engine))
    headers = {"Authorization": f"Bearer {REPORT_TOKEN}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers=headers
    ) as client:
        return (await client.get(f"/customers/{customer}")).text


class TestMoneyInReport:
    """The money of the last reconciliation reaches the report, its verdicts, table, CSV and page."""

    async def test_lines_carry_the_invoices(self, shop: Shop):
        """Each line sums its priced periods: b bills 3 cents on legacy, 8 on meter (+5)."""
        await planted_divergence(shop)
        lines = {line.customer: line for line in (await report_of(shop)).customers}
        b = lines[shop.customer("b")].drift
        assert b is not None and b.money is not None
        assert (b.money.currency, b.money.legacy_amount, b.money.meter_amount) == ("usd", 3, 8)
        assert (b.money.difference, b.money.largest_difference, b.money.differing) == (5, 5, 1)
        a = lines[shop.customer("a")].drift
        assert a is not None and a.money is not None and a.money.difference == 0
        assert CustomerMoney.model_validate(b.money.model_dump()) == b.money

    async def test_not_ready_while_invoices_differ(self, shop: Shop):
        """A shadow customer whose reconciled invoices differ is not ready for primary, and the
        reason says by how much; within the tolerance it is ready; a and c are ready."""
        await planted_divergence(shop)
        lines = {line.customer: line for line in (await report_of(shop)).customers}
        b = lines[shop.customer("b")].verdict
        assert not b.ready and b.next_stage is Stage.PRIMARY
        assert (
            "invoices differ: the meter path would bill +0.05 USD in its worst period" in b.reason
        )
        assert "tolerance 0" in b.reason
        for name in "ac":
            verdict = lines[shop.customer(name)].verdict
            assert verdict.ready, verdict.reason
        tolerant = await report_of(shop, readiness_max_money_difference=5)
        assert all(line.verdict.ready for line in tolerant.customers)
        assert "bills more than 5 (smallest currency unit) apart" in tolerant.readiness_rule

    async def test_other_currency_is_not_ready(self, shop: Shop):
        """A meter-backed price in another currency keeps every customer from primary."""
        period = await shop.close()
        eur = await meter_price(
            shop.builder, shop.catalog.product, shop.catalog.meter, "0.5", "eur"
        )
        await shop.reconcile(period.id, settings=shop.mapped(eur))
        for line in (await report_of(shop)).customers:
            assert not line.verdict.ready
            assert "bills in another currency" in line.verdict.reason

    async def test_table_and_csv(self, shop: Shop):
        """The terminal table has an invoice difference column (b first, in red); the CSV has each
        leg's amount and the difference in cents."""
        await planted_divergence(shop)
        report = await report_of(shop)
        console = Console(file=io.StringIO(), width=300)
        console.print(render_table(report))
        text = console.file.getvalue()  # type: ignore[attr-defined]
        assert "invoice difference" in text and "+0.05 USD" in text
        rows = {row["customer"]: row for row in csv.DictReader(io.StringIO(render_csv(report)))}
        b = rows[shop.customer("b")]
        assert (b["money_currency"], b["legacy_amount"], b["meter_amount"]) == ("usd", "3", "8")
        assert (b["invoice_difference"], b["largest_invoice_difference"]) == ("5", "5")
        lines = text.splitlines()
        first = next(index for index, line in enumerate(lines) if "cus_" in line)
        assert shop.customer("b") in lines[first]  # billing differently: ranked first

    async def test_pages_show_it(self, shop: Shop):
        """The overview has an invoice difference column; the customer page an Invoices card and
        each reconciled period's amounts."""
        period = await planted_divergence(shop)
        settings = shop.engine.settings.model_copy(update={"report_token": SecretStr(REPORT_TOKEN)})
        transport = httpx.ASGITransport(app=report_app(settings, engine=shop.engine))
        headers = {"Authorization": f"Bearer {REPORT_TOKEN}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers=headers
        ) as client:
            overview = (await client.get("/")).text
            page = (await client.get(f"/customers/{shop.customer('b')}")).text
        b = shop.customer("b")
        assert re.search(rf'data-money="{b}">\+0\.05 USD<', overview)
        assert re.search(r'data-money="legacy">0\.03 USD<', page)
        assert re.search(r'data-money="meter">0\.08 USD<', page)
        assert re.search(r'data-money="difference" class="neg">\+0\.05 USD<', page)
        assert re.search(rf'data-money-period="{re.escape(period.id)}">\+0\.05 USD<', page)

    async def test_admin_api_lists_the_records(self, shop: Shop):
        """GET /reconciliation: the stored records with their money, newest period first, and
        how many bill differently; a bad period is a 400 naming it."""
        period = await planted_divergence(shop)
        settings = shop.engine.settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)})
        api = admin_app(settings, engine=shop.engine)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://admin", headers=headers
        ) as client:
            everyone = (await client.get("/reconciliation")).json()
            b = await client.get(
                "/reconciliation", params={"customer": shop.customer("b"), "period": period.id}
            )
            bad = await client.get("/reconciliation", params={"period": "2026-13-45"})
        assert len(everyone["records"]) == 3 and everyone["money_differs"] == 1
        [record] = b.json()["records"]
        assert record["money"]["legacy_amount"] == 3 and record["money"]["meter_amount"] == 8
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "period"
