"""``dualwrite meters plan|apply`` against the stand-in: proposed meters, refusals, idempotent apply."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
from typer.testing import CliRunner, Result

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.exceptions import PriceError
from dualwrite.migrate import LegacyPrice, MeterPrice, plan_price
from dualwrite.pricing import Price
from dualwrite.testing import RequestLogEntry as StandinRequest, StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import LEGACY_VERSION, ScenarioBuilder, audit_entries, cli_environment

CONFIG = """\
# dualwrite for the test account
[flags]
safe_stage = "legacy"   # where unknown customers go

[[meters]]
event_name = "configured_calls"
legacy_prices = []
"""


pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A config file with comments and settings of its own, that apply must keep."""
    path = tmp_path / "dualwrite.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def cli(redis_url: str, key_prefix: str, standin_url: str):
    """Runs ``dualwrite ARGS`` on the test's Redis prefix and the stand-in."""
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        environment = cli_environment(redis_url, key_prefix, standin_url)
        return runner.invoke(app, list(args), env=environment)

    return invoke


async def _legacy_price(
    builder: ScenarioBuilder, product: str, aggregate: str, **extra: str
) -> str:
    created = await builder.client.v1.prices.create_async(
        # aggregate_usage is gone from the SDK's typed params (removed in basil).
        cast(
            Any,
            {
                "currency": "usd",
                "product": product,
                "unit_amount": 1,
                "recurring": {
                    "interval": "month",
                    "usage_type": "metered",
                    "aggregate_usage": aggregate,
                },
                **extra,
            },
        ),
        {"stripe_version": LEGACY_VERSION},
    )
    return created.id


@pytest.fixture
def catalog(standin_url: str) -> dict[str, str]:
    """Legacy metered prices (sum, last_during_period, max), a licensed one and a meter-backed one."""

    async def build() -> dict[str, str]:
        async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
            api = (await builder.client.v1.products.create_async({"name": "API"})).id
            seats = (await builder.client.v1.products.create_async({"name": "Seats"})).id
            peak = (await builder.client.v1.products.create_async({"name": "Peak GB"})).id
            prices = {
                "sum": await _legacy_price(builder, api, "sum", lookup_key="api-requests-metered"),
                "last": await _legacy_price(builder, seats, "last_during_period", nickname="Seats"),
                "max": await _legacy_price(builder, peak, "max"),
            }
            await builder.client.v1.prices.create_async(
                {
                    "currency": "usd",
                    "product": api,
                    "unit_amount": 100,
                    "recurring": {"interval": "month"},
                }
            )
            meter = await builder.client.v1.billing.meters.create_async(
                {
                    "display_name": "Other",
                    "event_name": "other",
                    "default_aggregation": {"formula": "count"},
                }
            )
            await builder.client.v1.prices.create_async(
                {
                    "currency": "usd",
                    "product": api,
                    "unit_amount": 1,
                    "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
                }
            )
            return prices

    return asyncio.run(build())


def _meters(standin: StripeStandin) -> dict[str, dict[str, Any]]:
    """The stand-in's meters by event name (through its own state)."""
    with standin._store.lock:
        return {
            meter.event_name: {"id": meter.id, "formula": meter.formula}
            for meter in standin._store.meters.values()
        }


def _creations(standin: StripeStandin) -> list[str | None]:
    """Idempotency keys of the meter creations by apply that the stand-in executed."""
    return [
        entry.idempotency_key
        for entry in standin.requests
        if entry.method == "POST"
        and entry.path == "/v1/billing/meters"
        and (entry.idempotency_key or "").startswith("dw-meter-create-")
        and entry.executed
    ]


class TestPlan:
    """``meters plan`` proposes one meter per event name and refuses prices without a meter twin."""

    def test_plan_json(self, cli, catalog, config_file):
        """sum → sum, last_during_period → last, max refused with its reason; others ignored."""
        result = cli("--config", str(config_file), "meters", "plan", "--json")
        assert result.exit_code == 0, result.output
        plan = json.loads(result.output)
        assert plan["prices_read"] == 3
        by_name = {meter["event_name"]: meter for meter in plan["meters"]}
        api = by_name["api_requests_metered"]
        assert (api["action"], api["formula"], api["prices"]) == ("create", "sum", [catalog["sum"]])
        assert api["lookup_keys"] == ["api-requests-metered"]
        assert api["customer_payload_key"] == "stripe_customer_id"
        assert api["value_payload_key"] == "value"
        seats = by_name["seats"]
        assert (seats["action"], seats["formula"]) == ("create", "last")
        refused = by_name["peak_gb"]
        assert refused["action"] == "refused" and refused["prices"] == [catalog["max"]]
        assert "aggregate_usage=max has no meter twin" in refused["reason"]
        assert "other" not in by_name

    def test_plan_table_and_configured_name(self, cli, catalog, tmp_path):
        """A price listed in [[meters]] takes that event name; the table shows the refusal."""
        path = tmp_path / "named.toml"
        path.write_text(
            f'[[meters]]\nevent_name = "api_calls"\nlegacy_prices = ["{catalog["sum"]}"]\n'
        )
        result = cli("--config", str(path), "meters", "plan")
        assert result.exit_code == 0, result.output
        assert "api_calls" in result.output and "api_requests_metered" not in result.output
        assert "refused" in result.output and "no meter twin" in result.output
        assert "3 legacy metered price(s): 2 meter(s) to create, 1 refused" in result.output

    def test_configured_meter_is_not_proposed_twice(self, cli, catalog, config_file, tmp_path):
        """A price whose meter-backed twin already bills it (after apply) is never given a
        second meter: mapped to another event name in [[meters]], it is refused, naming the
        meter that bills it and the event name to use."""
        assert cli("--config", str(config_file), "meters", "apply").exit_code == 0
        path = tmp_path / "renamed.toml"
        path.write_text(
            f'[[meters]]\nevent_name = "api_calls"\nlegacy_prices = ["{catalog["sum"]}"]\n'
        )
        result = cli("--config", str(path), "meters", "plan", "--json")
        assert result.exit_code == 0, result.output
        by_name = {meter["event_name"]: meter for meter in json.loads(result.output)["meters"]}
        renamed = by_name["api_calls"]
        assert renamed["action"] == "refused"
        assert "already bills it through a meter-backed price" in renamed["reason"]
        assert "map it to 'api_requests_metered'" in renamed["reason"]
        assert not [m for m in by_name.values() if m["action"] == "create"]

    def test_plan_without_key_is_refused(self, cli, catalog, config_file, monkeypatch):
        """No STRIPE_API_KEY: a clear message naming it, exit 2."""
        runner = CliRunner()
        result = runner.invoke(app, ["--config", str(config_file), "meters", "plan"], env={})
        assert result.exit_code == 2
        assert "STRIPE_API_KEY" in result.output


class TestApply:
    """``meters apply`` creates each meter once and writes the mapping, keeping the rest of the file."""

    def test_apply_twice_creates_each_meter_once(
        self, cli, catalog, config_file, standin, redis_url, key_prefix
    ):
        """Two applies: two meters created once, the config mapped once, both applies audited."""
        first = cli("--config", str(config_file), "meters", "apply")
        assert first.exit_code == 0, first.output
        meters = _meters(standin)
        assert meters["api_requests_metered"]["formula"] == "sum"
        assert meters["seats"]["formula"] == "last"
        assert "peak_gb" not in meters
        assert "refused" in first.output and catalog["max"] in first.output
        written = config_file.read_text()
        assert written.startswith("# dualwrite for the test account\n")
        assert 'safe_stage = "legacy"   # where unknown customers go' in written
        assert f"meter {meters['seats']['id']}" in written
        settings = Settings.load(config_file)
        by_name = {meter.event_name: meter for meter in settings.meters}
        assert by_name["api_requests_metered"].legacy_prices == (catalog["sum"],)
        assert by_name["api_requests_metered"].lookup_keys == ("api-requests-metered",)
        assert by_name["seats"].legacy_prices == (catalog["last"],)
        assert by_name["configured_calls"].legacy_prices == ()

        second = cli("--config", str(config_file), "meters", "apply")
        assert second.exit_code == 0, second.output
        assert _meters(standin) == meters
        assert len(_creations(standin)) == 2
        assert config_file.read_text() == written
        assert (
            "already exists" in second.output
            and "already maps every planned meter" in second.output
        )
        audit = audit_entries(redis_url, key_prefix)
        assert [entry.action for entry in audit] == ["meters.apply", "meters.apply"]
        assert set(audit[0].details["created"]) == {"api_requests_metered", "seats"}
        assert audit[1].details["created"] == {}
        assert STRIPE_KEY not in json.dumps([entry.model_dump() for entry in audit])

    def test_dry_run_changes_nothing(
        self, cli, catalog, config_file, standin, redis_url, key_prefix
    ):
        """--dry-run prints the exact calls and the config changes, and creates and writes nothing."""
        result = cli("--config", str(config_file), "meters", "apply", "--dry-run")
        assert result.exit_code == 0, result.output
        output = " ".join(result.output.split())
        assert "would call: POST /v1/billing/meters (Idempotency-Key: dw-meter-create-" in output
        assert "event_name=api_requests_metered default_aggregation[formula]=sum" in output
        assert "customer_mapping[type]=by_id" in output
        assert "value_settings[event_payload_key]=value" in output
        assert "would change" in output
        assert _meters(standin) == {"other": _meters(standin)["other"]}
        assert config_file.read_text() == CONFIG
        assert audit_entries(redis_url, key_prefix) == []

    def test_existing_meter_is_reused_or_refused(
        self, cli, catalog, config_file, standin_url, standin
    ):
        """A meter already named like a plan entry is reused; one with another formula is refused."""

        async def existing() -> None:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                for name, formula in (("api_requests_metered", "sum"), ("seats", "sum")):
                    await builder.client.v1.billing.meters.create_async(
                        {
                            "display_name": name,
                            "event_name": name,
                            "default_aggregation": {"formula": formula},
                        }
                    )

        asyncio.run(existing())
        before = _meters(standin)
        result = cli("--config", str(config_file), "meters", "apply", "--json")
        assert result.exit_code == 0, result.output
        applied = json.loads(result.output)
        assert applied["created"] == {}
        assert applied["existing"] == {"api_requests_metered": before["api_requests_metered"]["id"]}
        refused = {tuple(entry["prices"]): entry["reason"] for entry in applied["refused"]}
        assert "formula 'sum' (needs 'last')" in refused[(catalog["last"],)]
        assert _meters(standin) == before
        mapped = tomllib.loads(config_file.read_text())["meters"]
        assert [meter["event_name"] for meter in mapped] == [
            "configured_calls",
            "api_requests_metered",
        ]

    def test_apply_without_config_names_the_option(self, cli, catalog):
        """apply needs a config file to write into: exit 2 naming --config."""
        result = cli("meters", "apply")
        assert result.exit_code == 2
        assert "--config" in result.output


def _price_creations(standin: StripeStandin) -> list[StandinRequest]:
    """The meter-backed price creations by apply that the stand-in executed."""
    return [
        entry
        for entry in standin.requests
        if entry.method == "POST"
        and entry.path == "/v1/prices"
        and (entry.idempotency_key or "").startswith("dw-price-create-")
        and entry.executed
    ]


def _stripe_price(standin_url: str, price: str) -> Price:
    """A price as Stripe returns it (tiers expanded), through the SDK."""

    async def read() -> dict[str, Any]:
        async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
            found = await builder.client.raw_request_async(
                "get", f"/v1/prices/{price}", expand=["tiers"], stripe_version=LEGACY_VERSION
            )
            return dict(found.data)

    return Price.from_stripe(asyncio.run(read()))


class TestMeterBackedPrices:
    """Each legacy price gets the meter-backed price that bills the same, created once and mapped."""

    def test_plan_proposes_a_twin(self, cli, catalog, config_file):
        """The plan's twin has the legacy price's billing terms, product and meter, and names the
        legacy price it replaces; a refused meter has no price."""
        result = cli("--config", str(config_file), "meters", "plan", "--json")
        by_name = {meter["event_name"]: meter for meter in json.loads(result.output)["meters"]}
        [twin] = by_name["api_requests_metered"]["meter_prices"]
        assert (twin["legacy_price"], twin["action"]) == (catalog["sum"], "create")
        assert twin["params"]["currency"] == "usd" and twin["params"]["unit_amount"] == 1
        assert twin["params"]["recurring"] == {
            "interval": "month",
            "interval_count": 1,
            "usage_type": "metered",
            "meter": "(the meter)",
        }
        assert twin["params"]["metadata"] == {"dualwrite_replaces": catalog["sum"]}
        assert twin["terms"] == "1 usd a unit, every 1 month"
        assert by_name["peak_gb"]["meter_prices"] == []
        table = cli("--config", str(config_file), "meters", "plan")
        assert "meter-backed price" in table.output
        assert "2 meter-backed price(s) to create" in " ".join(table.output.split())

    def test_apply_creates_each_price_once_and_maps_it(
        self, cli, catalog, config_file, standin, standin_url
    ):
        """Two applies: each twin created once, on its meter, billing exactly like its legacy
        price; the config maps legacy → twin in meter_prices; the second apply finds them."""
        first = cli("--config", str(config_file), "meters", "apply", "--json")
        assert first.exit_code == 0, first.output
        created = json.loads(first.output)["prices_created"]
        assert set(created) == {catalog["sum"], catalog["last"]}
        meters = _meters(standin)
        for legacy, event_name in (
            (catalog["sum"], "api_requests_metered"),
            (catalog["last"], "seats"),
        ):
            twin = _stripe_price(standin_url, created[legacy])
            assert twin.meter == meters[event_name]["id"]
            assert _stripe_price(standin_url, legacy).differences(twin) == []
        settings = Settings.load(config_file)
        by_name = {meter.event_name: meter for meter in settings.meters}
        assert by_name["api_requests_metered"].meter_prices == {
            catalog["sum"]: created[catalog["sum"]]
        }
        assert by_name["seats"].meter_prices == {catalog["last"]: created[catalog["last"]]}
        written = config_file.read_text()

        second = cli("--config", str(config_file), "meters", "apply", "--json")
        assert second.exit_code == 0, second.output
        again = json.loads(second.output)
        assert again["prices_created"] == {} and again["prices_existing"] == created
        assert len(_price_creations(standin)) == 2
        assert config_file.read_text() == written

    def test_dry_run_prints_the_price_calls(self, cli, catalog, config_file, standin):
        """--dry-run prints each twin's creation call (the meter still to be created), makes none."""
        result = cli("--config", str(config_file), "meters", "apply", "--dry-run")
        output = " ".join(result.output.split())
        assert "would call: POST /v1/prices (Idempotency-Key: dw-price-create-" in output
        assert "recurring[meter]=(the meter)" in output
        assert f"metadata[dualwrite_replaces]={catalog['sum']}" in output
        assert _price_creations(standin) == []

    def test_decimal_price_twin(self, cli, config_file, standin, standin_url):
        """A legacy price of half a cent a unit gets a twin of half a cent a unit."""

        async def build() -> str:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                product = (await builder.client.v1.products.create_async({"name": "Storage"})).id
                created = await builder.client.v1.prices.create_async(
                    cast(
                        Any,
                        {
                            "currency": "usd",
                            "product": product,
                            "unit_amount_decimal": "0.5",
                            "recurring": {"interval": "month", "usage_type": "metered"},
                        },
                    ),
                    {"stripe_version": LEGACY_VERSION},
                )
                return created.id

        legacy = asyncio.run(build())
        result = cli("--config", str(config_file), "meters", "apply", "--json")
        assert result.exit_code == 0, result.output
        twin = _stripe_price(standin_url, json.loads(result.output)["prices_created"][legacy])
        assert str(twin.unit_amount) == "0.5" and twin.amount(7) == 4

    def test_mapped_price_that_bills_differently_is_refused(
        self, cli, catalog, standin, standin_url, tmp_path
    ):
        """A twin mapped in [[meters]] meter_prices that bills otherwise is refused with the
        difference; nothing is created for it and the mapping stays as it was."""

        async def dearer() -> str:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                meter = await builder.client.v1.billing.meters.create_async(
                    {
                        "display_name": "API",
                        "event_name": "api_calls",
                        "default_aggregation": {"formula": "sum"},
                    }
                )
                product = (await builder.client.v1.products.create_async({"name": "API 2"})).id
                created = await builder.client.v1.prices.create_async(
                    {
                        "currency": "usd",
                        "product": product,
                        "unit_amount": 2,
                        "recurring": {
                            "interval": "month",
                            "usage_type": "metered",
                            "meter": meter.id,
                        },
                    }
                )
                return created.id

        mapped = asyncio.run(dearer())
        path = tmp_path / "mapped.toml"
        text = (
            f'[[meters]]\nevent_name = "api_calls"\nlegacy_prices = ["{catalog["sum"]}"]\n'
            f'meter_prices = {{ {catalog["sum"]} = "{mapped}" }}\n'
        )
        path.write_text(text)
        result = cli("--config", str(path), "meters", "apply", "--json")
        assert result.exit_code == 0, result.output
        applied = json.loads(result.output)
        [refused] = applied["refused_prices"]
        assert refused["legacy_price"] == catalog["sum"]
        assert "bills differently: unit_amount '2' (not '1')" in refused["reason"]
        assert catalog["sum"] not in applied["prices_created"]
        assert Settings.load(path).meters[0].meter_prices == {catalog["sum"]: mapped}


def _legacy(data: dict[str, Any]) -> LegacyPrice:
    """A legacy metered price as the plan reads it."""
    return LegacyPrice(
        id=data["id"],
        product="prod_1",
        product_name="API",
        lookup_key=None,
        nickname="Fonts",
        aggregate_usage="sum",
        interval="month",
        active=True,
        price=Price.from_stripe(data),
    )


class TestPlanPrice:
    """Twins of tiered and transformed prices (the stand-in holds them from issue 16, phase 2)."""

    TIERED: ClassVar[dict[str, Any]] = {
        "id": "price_fonts",
        "currency": "usd",
        "billing_scheme": "tiered",
        "tiers_mode": "graduated",
        "recurring": {"interval": "month", "interval_count": 1, "usage_type": "metered"},
        "tiers": [
            {"up_to": 5, "unit_amount": 500, "flat_amount": 1000},
            {"up_to": None, "unit_amount_decimal": "0.5", "flat_amount_decimal": None},
        ],
    }

    def test_tiered_twin(self):
        """Same mode and tiers (inf for the last), the nickname kept."""
        planned = plan_price(_legacy(self.TIERED), meter=None, existing=[], mapped=None)
        assert planned.action == "create"
        assert planned.params["tiers_mode"] == "graduated"
        assert planned.params["tiers"] == [
            {"up_to": 5, "unit_amount": 500, "flat_amount": 1000},
            {"up_to": "inf", "unit_amount_decimal": "0.5"},
        ]
        assert planned.params["nickname"] == "Fonts"
        assert planned.terms == "graduated tiers (2) in usd, every 1 month"
        params = planned.create_params("mtr_1")
        assert params["recurring"]["meter"] == "mtr_1" and "transform_quantity" not in params

    def test_package_twin(self):
        """transform_quantity goes along."""
        data = {
            "id": "price_rental",
            "currency": "usd",
            "unit_amount": 1000,
            "transform_quantity": {"divide_by": 60, "round": "up"},
            "recurring": {"interval": "month", "usage_type": "metered"},
        }
        planned = plan_price(_legacy(data), meter=None, existing=[], mapped=None)
        assert planned.params["transform_quantity"] == {"divide_by": 60, "round": "up"}
        assert planned.terms == "1000 per 60 (up) usd a unit, every 1 month"

    def test_existing_twin_on_the_meter_is_reused(self):
        """A price on the meter billing the same is reused; one billing otherwise, or on another
        meter, is not."""
        legacy = _legacy(self.TIERED)
        twin = Price.from_stripe(
            self.TIERED | {"id": "price_twin", "recurring": {"interval": "month", "meter": "mtr_1"}}
        )
        other = Price.from_stripe(
            self.TIERED
            | {
                "id": "price_vol",
                "tiers_mode": "volume",
                "recurring": {"interval": "month", "meter": "mtr_1"},
            }
        )
        existing = [MeterPrice(other, None, True), MeterPrice(twin, None, True)]
        assert (
            plan_price(legacy, meter="mtr_1", existing=existing, mapped=None).price_id
            == "price_twin"
        )
        assert plan_price(legacy, meter="mtr_2", existing=existing, mapped=None).action == "create"

    def test_unbillable_legacy_price_is_refused(self):
        """A legacy price dualwrite cannot read gets no twin, with the reason."""
        broken = dataclasses.replace(_legacy(self.TIERED), price=PriceError("price_x: no tiers"))
        planned = plan_price(broken, meter=None, existing=[], mapped=None)
        assert planned.action == "refused" and planned.reason.startswith("price_x: no tiers")
