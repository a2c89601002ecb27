"""``dualwrite backfill``: legacy usage replayed as meter events, counted once, within 35 days."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from dualwrite.cli import app
from dualwrite.config import RedisSettings
from dualwrite.keys import KeySpace
from dualwrite.ledger import Ledger
from dualwrite.redis_client import open_redis
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    Scenario,
    ScenarioBuilder,
    audit_entries,
    cli_environment,
    meter_summary as support_meter_summary,
)

DAY = 86_400


pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def scenario(standin_url: str) -> Scenario:
    """A customer on a legacy metered price (sum) whose meter exists, with 12 units reported to the
    legacy path in the open period, and a second customer."""

    async def build() -> Scenario:
        async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
            found = await builder.customer("Backfilled")
            for quantity in (7, 5):
                await builder.legacy_usage(found.item, quantity)
            return found

    return asyncio.run(build())


@pytest.fixture
def config_file(tmp_path: Path, scenario: Scenario) -> Path:
    """The mapping `meters apply` would have written: the legacy price → the meter."""
    path = tmp_path / "dualwrite.toml"
    path.write_text(
        f'[[meters]]\nevent_name = "{EVENT_NAME}"\nlegacy_prices = ["{scenario.legacy_price}"]\n'
    )
    return path


@pytest.fixture
def cli(redis_url: str, key_prefix: str, standin_url: str, config_file: Path):
    """Runs ``dualwrite --config FILE backfill ARGS`` on the test's Redis prefix and the stand-in."""
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        environment = cli_environment(
            redis_url, key_prefix, standin_url, DUALWRITE_LEDGER__PERIODS="day"
        )
        return runner.invoke(
            app, ["--config", str(config_file), "backfill", *args], env=environment
        )

    return invoke


def meter_summary(standin_url: str, scenario: Scenario) -> float:
    """The meter's total for the customer over the last 36 days, through Stripe's summaries API."""

    async def read() -> float:
        async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
            now = int(time.time())
            page = await builder.client.v1.billing.meters.event_summaries.list_async(
                scenario.meter,
                {
                    "customer": scenario.customer,
                    "start_time": now - now % 60 - 36 * DAY,
                    "end_time": now - now % 60 + 600,
                },
            )
            return sum(summary.aggregated_value for summary in page.data)

    return asyncio.run(read())


def ledger_backfilled(redis_url: str, key_prefix: str, customer: str) -> dict[str, int]:
    """The customer's backfill counters summed over the ledger rows."""

    async def read() -> dict[str, int]:
        client = open_redis(RedisSettings(url=redis_url, key_prefix=key_prefix))
        try:
            rows = await Ledger(client, KeySpace(key_prefix)).rows(customer=customer)
        finally:
            await client.aclose()
        names = ("meter_backfilled_events", "meter_backfilled_qty", "meter_accepted_qty")
        return {name: sum(row[name] for row in rows) for name in names}

    return asyncio.run(read())


def written_keys(
    redis_url: str, key_prefix: str, customer: str, identifiers: list[str]
) -> list[str]:
    """Which of the keys a backfill writes exist: ledger index, audit stream, markers."""
    keys = KeySpace(key_prefix)
    shard = keys.for_customer(customer)
    names = [shard.ledger_index, keys.ops_audit]
    names += [shard.backfill_marker(identifier) for identifier in identifiers]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [name for name in names if client.exists(name)]
    finally:
        client.close()


def meter_events(standin: StripeStandin) -> int:
    """How many meter events the stand-in holds."""
    return int(standin.state()["counts"]["meter_events"])


class TestFromSummaries:
    """From usage record summaries: the open period's legacy total, less what the meter holds."""

    def test_twice_counts_once(self, cli, scenario, standin_url, standin, redis_url, key_prefix):
        """Two runs: the meter and the ledger hold the 12 units once; both runs are audited."""
        first = cli("--customer", scenario.customer)
        assert first.exit_code == 0, first.output
        assert "sent 12 unit(s) (1 sent)" in " ".join(first.output.split())
        assert meter_summary(standin_url, scenario) == 12
        counted = ledger_backfilled(redis_url, key_prefix, scenario.customer)
        assert counted == {
            "meter_backfilled_events": 1,
            "meter_backfilled_qty": 12,
            "meter_accepted_qty": 12,
        }
        second = cli("--customer", scenario.customer, "--json")
        assert second.exit_code == 0, second.output
        replay = json.loads(second.output)
        assert replay["counts"]["already"] == 1 and replay["counts"]["sent"] == 0
        assert meter_summary(standin_url, scenario) == 12
        assert ledger_backfilled(redis_url, key_prefix, scenario.customer) == counted
        assert meter_events(standin) == 1
        report = CliRunner().invoke(
            app,
            ["report", "--customer", scenario.customer, "--json"],
            env={"DUALWRITE_REDIS__URL": redis_url, "DUALWRITE_REDIS__KEY_PREFIX": key_prefix},
        )
        assert report.exit_code == 0, report.output
        [line] = json.loads(report.output)["customers"]
        assert (line["meter"]["backfilled_events"], line["meter"]["backfilled_qty"]) == (1, 12)
        audit = audit_entries(redis_url, key_prefix)
        assert [entry.action for entry in audit] == ["backfill", "backfill"]
        assert audit[0].details["sent_qty"] == 12 and audit[1].details["already"] == 1
        assert STRIPE_KEY not in json.dumps([entry.model_dump() for entry in audit])

    def test_shadowed_usage_is_not_replayed(self, cli, scenario, standin_url):
        """Usage already on the meter (shadowed since the customer entered shadow) is subtracted."""

        async def shadowed() -> None:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                await builder.legacy_usage(scenario.item, 3)
                await builder.client.v1.billing.meter_events.create_async(
                    {
                        "event_name": EVENT_NAME,
                        "payload": {"stripe_customer_id": scenario.customer, "value": "3"},
                    }
                )

        asyncio.run(shadowed())
        result = cli("--customer", scenario.customer)
        assert result.exit_code == 0, result.output
        assert "legacy 15, already on the meter 3" in " ".join(result.output.split())
        assert meter_summary(standin_url, scenario) == 15

    def test_since_replays_closed_periods_within_35_days(
        self, tmp_path, standin, standin_url, redis_url, key_prefix
    ):
        """--since reaches back period by period; a period that ended over 35 days ago is refused
        and counted, a later closed one is replayed inside its own period."""
        now = int(time.time())

        async def history() -> Scenario:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                standin.clock.set(now - 70 * DAY)
                found = await builder.customer("Long-standing")
                for back, quantity in ((69, 2), (20, 3), (0, 4)):
                    standin.clock.set(now - back * DAY)
                    await builder.legacy_usage(found.item, quantity)
                return found

        found = asyncio.run(history())
        path = tmp_path / "history.toml"
        path.write_text(
            f'[[meters]]\nevent_name = "{EVENT_NAME}"\nlegacy_prices = ["{found.legacy_price}"]\n'
        )
        since = str(now - 75 * DAY)
        env = {
            "DUALWRITE_REDIS__URL": redis_url,
            "DUALWRITE_REDIS__KEY_PREFIX": key_prefix,
            "DUALWRITE_STRIPE__API_BASE": standin_url,
            "STRIPE_API_KEY": STRIPE_KEY,
        }
        result = CliRunner().invoke(
            app,
            ["--config", str(path), "backfill", "--customer", found.customer, "--since", since],
            env=env,
        )
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert "sent 7 unit(s) (2 sent, 1 too_old)" in text
        assert "2 unit(s) too old for a meter" in text
        events = json.loads(
            CliRunner()
            .invoke(
                app,
                [
                    "--config",
                    str(path),
                    "backfill",
                    "--customer",
                    found.customer,
                    "--since",
                    since,
                    "--dry-run",
                    "--json",
                ],
                env=env,
            )
            .output
        )["events"]
        # The rerun (dry) finds both replayed periods counted, and nothing left to send for them.
        assert [(e["status"], e["quantity"]) for e in events] == [
            ("too_old", 2),
            ("already", 0),
            ("already", 0),
        ]
        assert now - 36 * DAY < events[1]["timestamp"] < now - 5 * DAY
        assert meter_summary(standin_url, found) == 7
        assert ledger_backfilled(redis_url, key_prefix, found.customer)["meter_backfilled_qty"] == 7

    def test_customer_on_a_test_clock(self, tmp_path, standin, standin_url, redis_url, key_prefix):
        """A customer on a Stripe test clock frozen 60 days back: its open period and the meter's
        35 days are the clock's, so its legacy usage is replayed at the clock's time (judged by
        the process clock it was "too old" and nothing was sent)."""
        frozen = int(time.time()) - 60 * DAY

        async def on_a_clock() -> Scenario:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                legacy, metered, meter = await builder._catalog()
                client = builder.client
                clock = await client.v1.test_helpers.test_clocks.create_async(
                    {"frozen_time": frozen}
                )
                customer = await client.v1.customers.create_async(
                    {"name": "Rehearsal", "test_clock": clock.id}
                )
                subscription = await client.v1.subscriptions.create_async(
                    {"customer": customer.id, "items": [{"price": legacy}]},
                    {"stripe_version": LEGACY_VERSION},
                )
                item = subscription["items"]["data"][0]["id"]
                await builder.legacy_usage(item, 6)
                await client.v1.test_helpers.test_clocks.advance_async(
                    clock.id, {"frozen_time": frozen + DAY}
                )
                await client.v1.test_helpers.test_clocks.retrieve_async(clock.id)
                return Scenario(customer.id, subscription.id, item, legacy, metered, meter)

        found = asyncio.run(on_a_clock())
        path = tmp_path / "clock.toml"
        path.write_text(
            f'[[meters]]\nevent_name = "{EVENT_NAME}"\nlegacy_prices = ["{found.legacy_price}"]\n'
        )
        result = CliRunner().invoke(
            app,
            ["--config", str(path), "backfill", "--customer", found.customer, "--json"],
            env=cli_environment(redis_url, key_prefix, standin_url),
        )
        assert result.exit_code == 0, result.output
        (event,) = json.loads(result.output)["events"]
        assert (event["status"], event["quantity"], event["timestamp"]) == ("sent", 6, frozen + DAY)

        async def meter_total() -> float:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                return await support_meter_summary(
                    builder.client, found.meter, found.customer, frozen, frozen + 2 * DAY
                )

        assert asyncio.run(meter_total()) == 6
        assert ledger_backfilled(redis_url, key_prefix, found.customer)["meter_backfilled_qty"] == 6

    def test_dry_run_changes_nothing(self, cli, scenario, standin, redis_url, key_prefix):
        """--dry-run says what it would send; no meter event, no ledger, marker or audit key."""
        result = cli("--customer", scenario.customer, "--dry-run")
        assert result.exit_code == 0, result.output
        assert "would send 12 unit(s)" in " ".join(result.output.split())
        planned = json.loads(cli("--customer", scenario.customer, "--dry-run", "--json").output)
        identifiers = [event["identifier"] for event in planned["events"]]
        assert [event["status"] for event in planned["events"]] == ["would_send"]
        assert meter_events(standin) == 0
        assert written_keys(redis_url, key_prefix, scenario.customer, identifiers) == []
        assert cli("--customer", scenario.customer).exit_code == 0
        written = written_keys(redis_url, key_prefix, scenario.customer, identifiers)
        assert len(written) == 3  # the check above can see them

    def test_unknown_customer(self, cli, scenario, standin):
        """An unknown customer: exit 2, the message names --customer, nothing is sent."""
        result = cli("--customer", "cus_nobody")
        assert result.exit_code == 2
        assert "--customer cus_nobody: no such customer" in " ".join(result.output.split())
        assert meter_events(standin) == 0
        bad = cli("--customer", "cus x")
        assert bad.exit_code == 2 and "--customer" in bad.output


class TestFromExport:
    """From an export file: one meter event per row of the customer, within 35 days."""

    def _export(self, path: Path, scenario: Scenario, rows: list[str]) -> Path:
        path.write_text("customer,subscription_item,event_name,quantity,timestamp,identifier\n")
        with path.open("a") as handle:
            handle.writelines(row + "\n" for row in rows)
        return path

    def test_twice_counts_once_and_refuses_old_rows(
        self, cli, scenario, tmp_path, standin_url, standin, redis_url, key_prefix
    ):
        """Rows in the window are sent once over two runs; a 40-day-old row is refused and counted;
        another customer's row is skipped."""
        now = int(time.time())
        export = self._export(
            tmp_path / "usage.csv",
            scenario,
            [
                f"{scenario.customer},,{EVENT_NAME},4,{now - 2 * DAY},u-1",
                f"{scenario.customer},{scenario.item},,6,{now - 3600},u-2",
                f"{scenario.customer},,{EVENT_NAME},9,{now - 40 * DAY},u-old",
                f"cus_someoneelse,,{EVENT_NAME},100,{now - 3600},u-3",
            ],
        )
        first = cli("--customer", scenario.customer, "--from-export", str(export), "--json")
        assert first.exit_code == 0, first.output
        result = json.loads(first.output)
        assert result["counts"]["sent"] == 2 and result["counts"]["too_old"] == 1
        assert result["skipped_rows"] == 1
        assert meter_summary(standin_url, scenario) == 10
        assert (
            ledger_backfilled(redis_url, key_prefix, scenario.customer)["meter_backfilled_qty"]
            == 10
        )
        second = cli("--customer", scenario.customer, "--from-export", str(export))
        assert second.exit_code == 0, second.output
        text = " ".join(second.output.split())
        assert "2 already" in text and "9 unit(s) too old for a meter" in text
        assert meter_summary(standin_url, scenario) == 10
        assert ledger_backfilled(redis_url, key_prefix, scenario.customer) == {
            "meter_backfilled_events": 2,
            "meter_backfilled_qty": 10,
            "meter_accepted_qty": 10,
        }

    def test_event_sent_by_an_interrupted_run_is_counted_once(
        self, cli, scenario, tmp_path, standin_url, standin, redis_url, key_prefix
    ):
        """An event Stripe already has (a run died before counting it) is counted, not resent."""
        now = int(time.time())
        export = self._export(
            tmp_path / "usage.csv", scenario, [f"{scenario.customer},,{EVENT_NAME},4,{now},u-1"]
        )
        args = ("--customer", scenario.customer, "--from-export", str(export), "--json")
        [planned] = json.loads(cli(*args, "--dry-run").output)["events"]

        async def interrupted() -> None:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                await builder.client.v1.billing.meter_events.create_async(
                    {
                        "event_name": EVENT_NAME,
                        "identifier": planned["identifier"],
                        "payload": {"stripe_customer_id": scenario.customer, "value": "4"},
                        "timestamp": now,
                    }
                )

        asyncio.run(interrupted())
        result = cli(*args)
        assert result.exit_code == 0, result.output
        [event] = json.loads(result.output)["events"]
        assert (event["status"], event["note"]) == (
            "already",
            "sent by an interrupted run; counted now",
        )
        assert meter_summary(standin_url, scenario) == 4
        assert (
            ledger_backfilled(redis_url, key_prefix, scenario.customer)["meter_backfilled_qty"] == 4
        )
        cli(*args)
        assert (
            ledger_backfilled(redis_url, key_prefix, scenario.customer)["meter_backfilled_qty"] == 4
        )

    def test_bad_row_names_the_line_and_column(self, cli, scenario, tmp_path, standin):
        """A bad quantity on line 3 refuses the whole file before anything is sent."""
        now = int(time.time())
        export = self._export(
            tmp_path / "bad.csv",
            scenario,
            [
                f"{scenario.customer},,{EVENT_NAME},4,{now - 60},u-1",
                f"{scenario.customer},,{EVENT_NAME},ten,{now - 60},u-2",
            ],
        )
        result = cli("--customer", scenario.customer, "--from-export", str(export))
        assert result.exit_code == 2
        text = " ".join(result.output.split())
        assert "line 3: column quantity 'ten' is not a whole number" in text
        assert meter_events(standin) == 0

    def test_missing_column_and_foreign_item(self, cli, scenario, tmp_path, standin):
        """A header without identifier, or an item of another customer: clear errors, nothing sent."""
        path = tmp_path / "noid.csv"
        path.write_text(f"customer,event_name,quantity,timestamp\n{scenario.customer},x,1,1\n")
        result = cli("--customer", scenario.customer, "--from-export", str(path))
        assert result.exit_code == 2 and "lacks column(s) identifier" in result.output
        now = int(time.time())
        export = self._export(
            tmp_path / "foreign.csv", scenario, [f"{scenario.customer},si_other,,4,{now},u-1"]
        )
        result = cli("--customer", scenario.customer, "--from-export", str(export))
        assert result.exit_code == 2
        assert "column subscription_item 'si_other' is not an item of" in " ".join(
            result.output.split()
        )
        assert meter_events(standin) == 0
