"""``dualwrite meters plan|apply`` against the stand-in: proposed meters, refusals, idempotent apply."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any, cast

import pytest
from typer.testing import CliRunner, Result

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.testing import StripeStandin
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
