"""What every ``dualwrite`` command has in common: --version, -h, -c anywhere, sections in help,
values shown as what to type, --json on reads, --dry-run and --actor/--reason on changes, stage
names in any case, times as ISO 8601 UTC, and the one-stage rule on every flag change."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.main import get_command

from dualwrite.cli import app
from tests.cli.test_cli import cli, ok, text
from tests.support import audit_entries

__all__ = ["cli"]  # the fixture, shared with tests/cli/test_cli.py

pytestmark = pytest.mark.usefixtures("clean_environment")


def every_command() -> list[list[str]]:
    """The argument lists naming every command and group (``[]`` is the root)."""
    found: list[list[str]] = []

    def walk(command, path: list[str]) -> None:
        found.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(get_command(app), [])
    return found


class TestHelp:
    """--version, -h, and help that reads as what to type."""

    def test_version(self, cli):
        """--version prints the installed version and exits 0."""
        assert ok(cli("--version")) == f"dualwrite {version('dualwrite')}"

    @pytest.mark.parametrize("path", every_command(), ids=lambda p: " ".join(p) or "root")
    def test_every_help_shows_values_not_python_types(self, cli, path):
        """-h works everywhere, and no help shows a Python type (<str>, <list[str]>, <int range>)."""
        output = ok(cli(*path, "-h"))
        assert "Usage:" in output
        assert not re.search(r"<[a-z_\[\], |]+>", output), output

    def test_commands_are_grouped(self, cli):
        """The root help lists commands under Migrate, Operate, Inspect and Serve, in that order."""
        output = ok(cli("-h"))
        positions = [
            output.index(f"{title}:") for title in ("Migrate", "Operate", "Inspect", "Serve")
        ]
        assert positions == sorted(positions)
        assert output.index(" rollout ") < output.index("Operate:") < output.index(" worker ")
        assert output.index("Inspect:") < output.index(" reconcile ") < output.index("Serve:")

    def test_choices_are_shown(self, cli):
        """A choice shows its values: `flags kill` on|off|status, a stage its four names."""
        assert "on|off|status" in ok(cli("flags", "kill", "-h"))
        assert "legacy|shadow|primary|meter" in ok(cli("flags", "set", "-h"))


class TestConfigAnywhere:
    """-c/--config is read before or after the command."""

    @pytest.mark.parametrize(
        "args",
        [
            ("-c", "{path}", "flags", "list"),
            ("flags", "-c", "{path}", "list"),
            ("flags", "list", "-c", "{path}"),
            ("flags", "list", "--config={path}"),
        ],
    )
    def test_position(self, cli, tmp_path: Path, args):
        """Wherever -c stands, the file is read (this one is invalid: exit 2 naming it)."""
        path = tmp_path / "bad.toml"
        path.write_text("[redis]\nshards = 0\n", encoding="utf-8")
        result = cli(*[arg.format(path=path) for arg in args])
        assert result.exit_code == 2
        assert f"invalid configuration in {path}" in text(result)


class TestReadsAsJson:
    """--json on every read command of flags."""

    def test_flags_reads(self, cli):
        """get, list, history, default, rollout and kill print JSON with --json."""
        ok(cli("flags", "set", "cus_A1", "Shadow", "--actor", "a", "--reason", "pilot"))
        [got] = json.loads(cli("flags", "get", "cus_A1", "--json").output)
        assert got["customer"] == "cus_A1" and got["stage"] == "shadow"
        listing = json.loads(cli("flags", "list", "--json").output)
        assert listing["overrides"] == {"cus_A1": "shadow"} and listing["kill"] is False
        [entry] = json.loads(cli("flags", "history", "--json").output)
        assert entry["actor"] == "a" and entry["reason"].endswith("pilot")
        assert json.loads(cli("flags", "default", "--json").output) == {"default": "legacy"}
        assert json.loads(cli("flags", "rollout", "--json").output)["shadow"] == 0
        assert json.loads(cli("flags", "kill", "--json").output) == {"kill": False}

    def test_customer_lists(self, cli):
        """A list of customers is spaces or commas, the same everywhere."""
        ok(cli("flags", "set", "cus_A1", "shadow"))
        rows = json.loads(cli("flags", "get", "cus_A1,cus_B2", "cus_C3", "--json").output)
        assert [row["customer"] for row in rows] == ["cus_A1", "cus_B2", "cus_C3"]


class TestChanges:
    """Every flag change: --dry-run changes nothing, one stage at a time unless --force, nothing
    in the past, stage names in any case, times in ISO 8601."""

    def test_dry_run_changes_nothing(self, cli):
        """set, default, rollout, schedule and kill with --dry-run leave the audit log empty."""
        for args in (
            ("flags", "set", "cus_A1", "shadow"),
            ("flags", "default", "shadow"),
            ("flags", "rollout", "shadow", "10"),
            ("flags", "schedule", "cus_A1", "shadow", "--at", "2099-01-01T00:00:00Z"),
            ("flags", "kill", "on"),
            ("flags", "kill", "off"),
        ):
            output = ok(cli(*args, "--dry-run"))
            assert "nothing was changed" in output, args
        assert json.loads(cli("flags", "history", "--json").output) == []
        assert "cus_A1 legacy default" in ok(cli("flags", "get", "cus_A1"))

    def test_one_stage_at_a_time(self, cli):
        """set, default and schedule refuse a jump of stages without --force, and take it with."""
        for args in (
            ("flags", "set", "cus_A1", "primary"),
            ("flags", "default", "meter"),
            ("flags", "schedule", "cus_A1", "meter", "--at", "2099-01-01T00:00:00Z"),
        ):
            refused = cli(*args)
            assert refused.exit_code == 2 and "one stage at a time" in text(refused), args
        assert json.loads(cli("flags", "history", "--json").output) == []
        ok(cli("flags", "set", "cus_A1", "primary", "--force"))
        assert "cus_A1 primary override" in ok(cli("flags", "get", "cus_A1"))

    def test_schedule_follows_the_stage_at_its_time(self, cli):
        """A schedule is one stage on from where the customer will be at that time."""
        ok(cli("flags", "schedule", "cus_A1", "shadow", "--at", "2099-01-01T00:00:00Z"))
        ok(cli("flags", "schedule", "cus_A1", "PRIMARY", "--at", "2099-02-01T00:00:00Z"))
        refused = cli("flags", "schedule", "cus_A1", "meter", "--at", "2099-01-15T00:00:00Z")
        assert refused.exit_code == 2 and "cus_A1 is at shadow" in text(refused)

    def test_schedule_in_the_past(self, cli):
        """A past time is refused (with ISO times, not Unix seconds); --at now moves at once."""
        refused = cli("flags", "schedule", "cus_A1", "shadow", "--at", "1700000000")
        output = text(refused)
        assert refused.exit_code == 2
        assert "--at 2023-11-14T22:13:20Z is in the past (now is 20" in output
        assert "1700000000" not in output
        assert json.loads(cli("flags", "history", "--json").output) == []
        ok(cli("flags", "schedule", "cus_A1", "shadow", "--at", "now"))
        assert "cus_A1 shadow schedule" in ok(cli("flags", "get", "cus_A1"))
        [entry] = json.loads(cli("flags", "history", "--json").output)
        assert re.search(r"at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["reason"]), entry

    def test_cutover_in_the_past_says_iso_times(self, cli):
        """cutover's refusal of a past time shows ISO 8601, not Unix seconds."""
        refused = cli("cutover", "cus_A1", "--to", "shadow", "--at", "2020-01-01T00:00:00Z")
        assert refused.exit_code == 2
        assert "--at 2020-01-01T00:00:00Z is in the past (now is 20" in text(refused)

    def test_guard_and_dead_letters_take_actor_and_reason(self, cli, redis_url, key_prefix):
        """guard --once and dead retry|drop take --actor and --reason (the audit note); the
        filter of dead letters is --kind."""
        result = cli("guard", "--once", "--actor", "oncall", "--reason", "nightly check")
        assert "checked 0 customer(s)" in ok(result)
        assert "nothing to retry" in ok(
            cli("dead", "retry", "--all", "--kind", "refused", "--actor", "a", "--reason", "r")
        )
        assert "no dead letters" in ok(cli("dead", "list", "--kind", "expired"))
        refused = cli("dead", "list", "--reason", "expired")
        assert refused.exit_code == 2 and "No such option: --reason" in text(refused)
        assert audit_entries(redis_url, key_prefix) == []  # nothing retried, nothing audited
