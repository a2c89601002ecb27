"""The ``dualwrite`` command through typer's CliRunner, against a real Redis under the test's prefix."""

from __future__ import annotations

import asyncio
import getpass
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from dualwrite.cli import app
from dualwrite.config import Settings
from dualwrite.demo import DemoOptions, DemoResult
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.outbox import OutboxWorker
from dualwrite.report import Report
from tests.conftest import STRIPE_KEY
from tests.support import ScenarioBuilder, make_settings, set_stage, usage

pytestmark = pytest.mark.usefixtures("clean_environment")

DEAD_REDIS = "redis://:s3cret@127.0.0.1:1/0"


@pytest.fixture
def cli(redis_url: str, key_prefix: str):
    """Runs ``dualwrite ARGS`` on the test Redis under this test's key prefix."""
    runner = CliRunner()

    def invoke(*args: str, **env: str) -> Result:
        environment = {
            "DUALWRITE_REDIS__URL": redis_url,
            "DUALWRITE_REDIS__KEY_PREFIX": key_prefix,
            "COLUMNS": "200",
            **env,
        }
        return runner.invoke(app, list(args), env=environment)

    return invoke


def text(result: Result) -> str:
    """Everything the command printed (stdout and stderr), with rich's wrapping and boxes undone."""
    output = result.output
    for box in "│╭╮╰╯─":
        output = output.replace(box, " ")
    return " ".join(output.split())


def ok(result: Result) -> str:
    """The output of a command that must have succeeded."""
    assert result.exit_code == 0, result.output
    return text(result)


def cohort(stage: str) -> str:
    """The audit reason's prefix of ``flags set`` (it moves a cohort of one)."""
    return f"rollout {stage} for a cohort of 1"


def history_rows(cli) -> list[list[str]]:
    """The rows of ``flags history``, as lists of cells."""
    result = cli("flags", "history")
    assert result.exit_code == 0, result.output
    return [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in result.output.splitlines()
        if line.startswith("│")
    ]


class TestFlags:
    """Each flags subcommand changes or shows the flags, and every change is audited."""

    def test_set_and_get(self, cli):
        """set pins a customer; get shows the stage and the rule that decided it."""
        assert ok(cli("flags", "set", "cus_A1", "shadow", "--actor", "alice")) == "cus_A1: shadow"
        output = ok(cli("flags", "get", "cus_A1", "cus_B2"))
        assert "cus_A1 shadow override" in output
        assert "cus_B2 legacy default" in output

    def test_set_clear_removes_the_override(self, cli):
        """set --clear drops the override, and the customer falls back to the default; a fall
        back is a rollback, so it needs --force."""
        ok(cli("flags", "set", "cus_A1", "shadow", "--actor", "alice"))
        refused = cli("flags", "set", "cus_A1", "--clear", "--actor", "bob")
        assert refused.exit_code == 2 and "is a rollback" in text(refused)
        assert ok(cli("flags", "set", "cus_A1", "--clear", "--force", "--actor", "bob")) == (
            "cus_A1: no override"
        )
        assert "cus_A1 legacy default" in ok(cli("flags", "get", "cus_A1"))

    def test_default(self, cli):
        """default shows the global default, and sets it when given a stage."""
        assert ok(cli("flags", "default")) == "default stage: legacy"
        assert ok(cli("flags", "default", "shadow", "--actor", "carol")) == (
            "default stage: shadow"
        )
        assert "cus_new shadow default" in ok(cli("flags", "get", "cus_new"))

    def test_rollout(self, cli):
        """rollout shows every rollout stage's share, and sets one ("25%" or "12.5")."""
        assert "shadow 0 % primary 0 % meter 0 %" in ok(cli("flags", "rollout"))
        ok(cli("flags", "rollout", "shadow", "25%", "--actor", "dave"))
        output = ok(cli("flags", "rollout", "primary", "12.5", "--actor", "dave"))
        assert "shadow 25 % primary 12.5 % meter 0 %" in output

    def test_schedule_with_iso_and_unix_times(self, cli):
        """schedule takes ISO 8601 (Z, offset or naive UTC) or Unix seconds; list shows the plan."""
        output = ok(
            cli(
                "flags",
                "schedule",
                "cus_A1",
                "shadow",
                "--at",
                "2030-01-01T00:00:00Z",
                "--actor",
                "e",
            )
        )
        assert output == "cus_A1: shadow from 2030-01-01T00:00:00Z"
        output = ok(
            cli("flags", "schedule", "cus_A1", "primary", "--at", "1900000000", "--actor", "e")
        )
        assert output == "cus_A1: primary from 2030-03-17T17:46:40Z"
        output = ok(cli("flags", "schedule", "cus_B2", "shadow", "--at", "2030-06-01T12:00:00"))
        assert output == "cus_B2: shadow from 2030-06-01T12:00:00Z"
        output = ok(cli("flags", "schedule", "cus_C3", "shadow", "--at", "2030-06-01T14:00+02:00"))
        assert output == "cus_C3: shadow from 2030-06-01T12:00:00Z"
        listing = ok(cli("flags", "list"))
        assert (
            "cus_A1 shadow from 2030-01-01T00:00:00Z, primary from 2030-03-17T17:46:40Z" in listing
        )

    def test_schedule_clear(self, cli):
        """schedule --clear removes every entry of the customer."""
        ok(cli("flags", "schedule", "cus_A1", "shadow", "--at", "1900000000"))
        assert ok(cli("flags", "schedule", "cus_A1", "--clear")) == "cus_A1: schedule cleared"
        assert "cus_A1" not in ok(cli("flags", "list"))

    def test_kill_switch(self, cli):
        """kill on sends everyone to legacy; kill shows the state; kill off lifts it."""
        ok(cli("flags", "set", "cus_A1", "shadow", "--actor", "a"))
        assert ok(cli("flags", "kill")) == "kill switch: off"
        assert ok(cli("flags", "kill", "on", "--actor", "oncall", "--reason", "incident")) == (
            "kill switch: ON (everyone legacy)"
        )
        assert ok(cli("flags", "kill")) == "kill switch: ON (everyone legacy)"
        assert "cus_A1 legacy kill" in ok(cli("flags", "get", "cus_A1"))
        assert ok(cli("flags", "kill", "off", "--actor", "oncall")) == "kill switch: off"
        assert "cus_A1 shadow override" in ok(cli("flags", "get", "cus_A1"))

    def test_list(self, cli):
        """list shows the default, kill switch, rollout, overrides and schedules."""
        ok(cli("flags", "default", "shadow", "--actor", "a"))
        ok(cli("flags", "rollout", "meter", "5", "--actor", "a", "--force"))
        ok(cli("flags", "set", "cus_A1", "primary", "--actor", "a"))
        ok(cli("flags", "schedule", "cus_B2", "primary", "--at", "1900000000", "--actor", "a"))
        output = ok(cli("flags", "list"))
        assert "default: shadow kill switch: off" in output
        assert "rollout: shadow 0 %, primary 0 %, meter 5 %" in output
        assert "cus_A1 primary" in output
        assert "cus_B2 primary from 2030-03-17T17:46:40Z" in output

    def test_history_records_actor_and_reason(self, cli):
        """history lists each change newest first, with actor, action, old, new and reason."""
        ok(cli("flags", "set", "cus_A1", "shadow", "--actor", "alice", "--reason", "pilot"))
        ok(cli("flags", "set", "cus_A1", "primary", "--actor", "bob", "--reason", "cut over"))
        ok(cli("flags", "kill", "on", "--actor", "oncall", "--reason", "incident"))
        rows = history_rows(cli)
        assert [row[1:] for row in rows] == [
            ["oncall", "set_kill", "*", "", "1", "incident"],
            [
                "bob",
                "set_override",
                "cus_A1",
                "shadow",
                "primary",
                f"{cohort('primary')}: cut over",
            ],
            ["alice", "set_override", "cus_A1", "", "shadow", f"{cohort('shadow')}: pilot"],
        ]
        assert all(row[0].endswith("Z") and "T" in row[0] for row in rows)

    def test_history_for_one_customer(self, cli):
        """history --customer keeps only that customer's changes."""
        ok(cli("flags", "set", "cus_A1", "shadow", "--actor", "alice"))
        ok(cli("flags", "set", "cus_B2", "shadow", "--actor", "bob"))
        output = ok(cli("flags", "history", "--customer", "cus_B2"))
        assert "cus_B2" in output and "bob" in output
        assert "cus_A1" not in output and "alice" not in output

    def test_default_actor_is_user_at_host(self, cli):
        """Without --actor, the audit log names user@host."""
        ok(cli("flags", "set", "cus_A1", "shadow"))
        [row] = history_rows(cli)
        assert row[1].startswith(f"{getpass.getuser()}@")


class TestBadInput:
    """Bad arguments exit non-zero with a message naming the argument, and change nothing."""

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (("flags", "set", "cus_A1", "beta"), "Invalid value for 'stage': 'beta' is not one of"),
            (("flags", "set", "cus_A1", "primary"), "moves go one stage at a time (next: shadow)"),
            (("flags", "default", "meter"), "moves go one stage at a time"),
            (
                ("flags", "schedule", "cus_A1", "shadow", "--at", "2020-01-01T00:00:00Z"),
                "--at 2020-01-01T00:00:00Z is in the past",
            ),
            (("flags", "schedule", "cus_A1", "meter", "--at", "now"), "one stage at a time"),
            (("flags", "set", "cus_A1", "shadow", "--clear"), "give a STAGE, or --clear"),
            (("flags", "set", "cus_A1"), "give a STAGE, or --clear"),
            (("flags", "default", "beta"), "Invalid value for 'stage'"),
            (("flags", "rollout", "shadow", "abc"), "percentage 'abc' is not a number"),
            (("flags", "rollout", "shadow"), "give both STAGE and PERCENT"),
            (
                ("flags", "schedule", "cus_A1", "meter", "--at", "yesterday"),
                "--at 'yesterday' is not a time; give Unix seconds or ISO 8601",
            ),
            (("flags", "schedule", "cus_A1", "meter"), "give both STAGE and --at"),
            (
                ("flags", "schedule", "cus_A1", "meter", "--clear"),
                "--clear takes no STAGE or --at",
            ),
            (("flags", "kill", "maybe"), "'maybe' is not one of 'on', 'off', 'status'"),
            (("flags", "history", "--limit", "0"), "Invalid value for '--limit'"),
            (("report", "--since", "yesterday"), "--since 'yesterday': write a day as YYYY-MM-DD"),
            (("report", "--until", "2026-13-01"), "--until '2026-13-01'"),
            (
                ("report", "--since", "2026-12-01", "--until", "2026-11-01"),
                "--since 2026-12-01 is after --until 2026-11-01; give the earlier day first",
            ),
        ],
    )
    def test_usage_errors(self, cli, args, expected):
        """A malformed argument is a usage error (exit 2) naming it."""
        result = cli(*args)
        assert result.exit_code == 2
        assert expected in text(result).replace("Value error, ", "")

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (("flags", "rollout", "shadow", "150"), "must be 0 to 100"),
            (("flags", "set", "bad customer!", "shadow"), "got 'bad customer!'"),
            (("flags", "schedule", "cus_A1", "shadow", "--at", "0", "--force"), "schedule time"),
        ],
    )
    def test_values_refused_by_the_store(self, cli, args, expected):
        """Values the flag store refuses exit 2 with its message, not a traceback."""
        result = cli(*args)
        assert result.exit_code == 2
        assert expected in text(result)
        assert "Traceback" not in result.output

    def test_bad_input_changes_nothing(self, cli):
        """After refused commands the audit log is still empty."""
        cli("flags", "set", "cus_A1", "beta")
        cli("flags", "rollout", "shadow", "abc")
        assert history_rows(cli) == []


class TestConfigAndRedisErrors:
    """A bad config exits 2 with the ConfigError; an unreachable Redis exits 1 without secrets."""

    def test_bad_config_file(self, cli, tmp_path: Path):
        """--config with a bad value prints the ConfigError (brackets intact) and exits 2."""
        path = tmp_path / "bad.toml"
        path.write_text('[[routes]]\npath = "/u"\ncustomer = "body:x"\nquantity = "json:q"\n')
        result = cli("--config", str(path), "flags", "list")
        assert result.exit_code == 2
        output = text(result)
        assert f"error: invalid configuration in {path}" in output
        assert "routes.0.customer = 'body:x'" in output
        assert "correct [routes] in the config file" in output

    def test_config_from_the_environment_variable(self, cli, tmp_path: Path):
        """DUALWRITE_CONFIG names the file when --config is absent."""
        result = cli("flags", "list", DUALWRITE_CONFIG=str(tmp_path / "missing.toml"))
        assert result.exit_code == 2
        assert "missing.toml' cannot be read" in text(result)

    def test_bad_variable(self, cli):
        """A bad DUALWRITE_* variable exits 2 naming key and value."""
        result = cli("flags", "list", DUALWRITE_REDIS__SHARDS="0")
        assert result.exit_code == 2
        assert "redis.shards = '0'" in text(result)

    @pytest.mark.parametrize(
        "args",
        [
            ("flags", "list"),
            ("flags", "set", "cus_A1", "shadow", "--actor", "a"),
            ("flags", "history"),
            ("report",),
        ],
    )
    def test_unreachable_redis(self, cli, args):
        """Redis down: exit 1, a hint how to point at Redis, and no password from the URL."""
        result = cli(
            *args,
            DUALWRITE_REDIS__URL=DEAD_REDIS,
            DUALWRITE_REDIS__CONNECT_TIMEOUT="0.2",
            DUALWRITE_REDIS__SOCKET_TIMEOUT="0.2",
        )
        assert result.exit_code == 1
        output = text(result)
        assert "error: Redis unavailable while" in output
        assert "Is Redis running? Set DUALWRITE_REDIS__URL (or REDIS_URL)" in output
        assert "[redis] url in the config file" in output
        assert "s3cret" not in result.output and "127.0.0.1:1" not in result.output


# ------------------------------------------------------------------------------------------ report


async def _traffic(settings: Settings, standin_url: str) -> dict[str, str]:
    """Usage for a legacy and a shadow customer (one shadow write left undelivered)."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    try:
        async with DualWriteEngine.from_settings(settings) as engine:
            legacy = await builder.customer("Legacy")
            shadow = await builder.customer("Shadow")
            pending = await builder.customer("Pending")
            await set_stage(engine, shadow.customer, Stage.SHADOW)
            await set_stage(engine, pending.customer, Stage.SHADOW)
            for quantity in (5, 7):
                assert (await engine.record(usage(legacy, quantity))).accepted
            assert (await engine.record(usage(shadow, 3))).accepted
            await OutboxWorker(engine.outbox, engine.writer).drain()
            assert (await engine.record(usage(pending, 4))).accepted
    finally:
        await builder.aclose()
    return {"legacy": legacy.customer, "shadow": shadow.customer, "pending": pending.customer}


@pytest.fixture
def customers(redis_url, key_prefix, standin_url) -> dict[str, str]:
    """Ledger rows for three customers under this test's prefix: legacy, shadow, pending."""
    settings = make_settings(
        redis_url=redis_url,
        prefix=key_prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        outbox={"run_in_process": False},
    )
    return asyncio.run(_traffic(settings, standin_url))


class TestReport:
    """report prints the ledger per customer, as a table or as the Report model's JSON."""

    def test_json_round_trips_into_report(self, cli, customers):
        """--json is the Report model's JSON: it parses back, with each customer's totals."""
        result = cli("report", "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        report = Report.model_validate_json(result.stdout)
        assert report.model_dump(mode="json") == data
        rows = {row.customer: row for row in report.customers}
        assert set(rows) == set(customers.values())
        legacy, shadow, pending = (
            rows[customers[name]] for name in ("legacy", "shadow", "pending")
        )
        assert legacy.stage is Stage.LEGACY and legacy.legacy.accepted_qty == 12
        assert legacy.meter.expected_qty == 0 and legacy.status == "parity"
        assert shadow.legacy.accepted_qty == shadow.meter.accepted_qty == 3
        assert shadow.status == "parity"
        assert pending.status == "pending" and pending.meter.pending_qty == 4
        assert report.outbox is not None and report.outbox.ready == 1

    def test_filters(self, cli, customers):
        """--customer, --stage and --divergent narrow the customers shown."""

        def shown(*args: str) -> set[str]:
            result = cli("report", "--json", *args)
            assert result.exit_code == 0, result.output
            return {row.customer for row in Report.model_validate_json(result.stdout).customers}

        assert shown("--customer", customers["shadow"]) == {customers["shadow"]}
        assert shown("--stage", "shadow") == {customers["shadow"], customers["pending"]}
        assert shown("--stage", "meter") == set()
        assert shown("--divergent") == set()
        assert shown("--since", "2000-01-01", "--until", "2000-12-31") == set()
        assert shown("--stage", "SHADOW") == {customers["shadow"], customers["pending"]}

    def test_unknown_customer(self, cli, customers):
        """--customer naming a customer the report holds nothing for: a message, exit 1."""
        result = cli("report", "--customer", "cus_nobody")
        assert result.exit_code == 1
        assert "no such customer 'cus_nobody': dualwrite holds no usage for it" in text(result)

    def test_table_lists_the_customers(self, cli, customers):
        """Without --json, a table with a line per customer, its stage and status."""
        output = ok(cli("report"))
        assert "dualwrite: usage per customer, legacy vs meter" in output
        assert f"{customers['legacy']} legacy 2 12 0 +12" in output
        assert f"{customers['shadow']} shadow 1 3 3 0" in output
        assert "readiness rule:" in output
        assert customers["pending"] in output and "pending" in output
        assert "outbox: 1 queued, 0 waiting to retry, 0 dead letters" in output

    def test_csv_and_period(self, cli, customers):
        """--csv prints a line per customer; --period takes a day or a billing period id."""
        result = cli("report", "--csv")
        assert result.exit_code == 0, result.output
        lines = result.stdout.strip().splitlines()
        assert lines[0].startswith("customer,stage,status") and len(lines) == 1 + len(customers)
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        on_day = cli("report", "--json", "--period", today)
        assert Report.model_validate_json(on_day.stdout).customers
        bad = cli("report", "--period", "last-month")
        assert bad.exit_code != 0 and "--period" in bad.output
        both = cli("report", "--json", "--csv")
        assert both.exit_code != 0 and "--json" in both.output

    def test_empty_report(self, cli):
        """No usage yet: an empty table, exit 0."""
        result = cli("report", "--json")
        assert result.exit_code == 0, result.output
        assert Report.model_validate_json(result.stdout).customers == []


# -------------------------------------------------------------------------------------------- demo


class TestDemo:
    """demo hands its options and the settings to dualwrite.demo.run_demo."""

    @pytest.fixture
    def calls(self, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
        """Replaces run_demo by a recorder (the demo itself is tested in test_demo.py)."""
        calls: list[dict[str, Any]] = []

        async def fake_run_demo(settings, options, *, console=None) -> DemoResult:
            calls.append({"settings": settings, "options": options, "console": console})
            return DemoResult(
                report=Report(
                    generated_at=0,
                    since=None,
                    until=None,
                    customers=[],
                    divergences=[],
                    outbox=None,
                ),
                customers=[],
            )

        monkeypatch.setattr("dualwrite.demo.run_demo", fake_run_demo)
        return calls

    def test_options_are_passed_through(self, cli, calls, key_prefix):
        """--customers, --events and --seed become DemoOptions; the settings are the loaded ones."""
        result = cli("demo", "--customers", "2", "--events", "50", "--seed", "11")
        assert result.exit_code == 0, result.output
        [call] = calls
        assert call["options"] == DemoOptions(customers_per_stage=2, events=50, seed=11)
        assert isinstance(call["settings"], Settings)
        assert call["settings"].redis.key_prefix == key_prefix
        assert call["console"] is not None

    def test_defaults(self, cli, calls):
        """Without options the demo gets DemoOptions' defaults."""
        assert cli("demo").exit_code == 0
        assert calls[0]["options"] == DemoOptions()

    def test_out_of_range_option(self, cli, calls):
        """--customers 0 is refused before the demo runs."""
        result = cli("demo", "--customers", "0")
        assert result.exit_code == 2 and "--customers" in text(result)
        assert calls == []
