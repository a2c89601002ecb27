"""Start-up (issue 20): ``import dualwrite`` and the command line load only what they use.

These tests check which modules get imported, never how long it takes (bench/startup.py measures
that against a bare interpreter in the same run).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main

from dualwrite.cli import COMMANDS, command_named

HEAVY = ("stripe", "starlette", "rich", "jinja2", "prometheus_client", "pydantic", "redis", "typer")


def loaded_after(code: str, *argv: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running ``code``."""
    probe = (
        f"import sys; sys.argv = ['dualwrite', *{list(argv)!r}]\n{code}\n"
        "import json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def run_cli(*args: str) -> str:
    """``dualwrite ARGS`` through the console-script entry point, in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", "from dualwrite.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class TestImportDualwrite:
    """``import dualwrite`` binds its public names on first use, not at import."""

    def test_import_pulls_in_no_dependency(self):
        """A fresh ``import dualwrite`` loads none of stripe, starlette, rich, jinja2, pydantic…"""
        assert loaded_after("import dualwrite") & set(HEAVY) == set()

    def test_first_use_imports_the_name(self):
        """Touching ``dualwrite.Stage`` imports its module then (and pydantic with it)."""
        loaded = loaded_after("import dualwrite; dualwrite.Stage")
        assert "pydantic" in loaded
        assert "stripe" not in loaded


class TestCommandLine:
    """The command line imports the module of the command it runs, and no other."""

    def test_help_loads_no_library_dependency(self):
        """``dualwrite --help`` imports neither stripe, starlette, pydantic, redis nor jinja2."""
        loaded = loaded_after(
            "from dualwrite.cli import main\ntry: main()\nexcept SystemExit: pass", "--help"
        )
        assert (
            loaded & {"stripe", "starlette", "pydantic", "redis", "jinja2", "prometheus_client"}
            == set()
        )

    def test_config_check_help_does_not_load_stripe(self):
        """``dualwrite config check --help`` does not import stripe or redis."""
        code = "from dualwrite.cli import main\ntry: main()\nexcept SystemExit: pass"
        loaded = loaded_after(code, "config", "check", "--help")
        assert loaded & {"stripe", "starlette", "redis", "jinja2"} == set()

    def test_help_lists_what_the_full_application_lists(self):
        """The lazy ``dualwrite --help`` is, byte for byte, the help of the fully loaded app."""
        full = subprocess.run(
            [
                sys.executable,
                "-c",
                "from dualwrite.cli import app; app(prog_name='dualwrite')",
                "--help",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"},
        )
        assert run_cli("--help") == full.stdout

    def test_table_matches_the_registered_commands(self):
        """COMMANDS names every command with its real module, section and summary."""
        from dualwrite.cli import app

        group = typer.main.get_command(app)
        assert isinstance(group, typer.core.TyperGroup)
        assert set(COMMANDS) == set(group.commands)
        for name, command in group.commands.items():
            entry = COMMANDS[name]
            callback = command.callback
            if isinstance(command, typer.core.TyperGroup):  # a group: any of its commands
                callback = next(iter(command.commands.values())).callback
            assert callback is not None
            assert callback.__module__ == f"dualwrite.cli.{entry.module}", name
            assert command.rich_help_panel == entry.panel, name  # type: ignore[attr-defined]
            assert command.get_short_help_str(1000) == entry.summary, name

    def test_a_missed_guess_still_runs_the_command(self):
        """Run through a root whose command was not loaded, the command imports and runs."""
        code = (
            "from dualwrite.cli import root_command\n"
            "root_command([]).main(['durability', '--help'], prog_name='dualwrite')"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Usage: dualwrite durability [OPTIONS]")

    @pytest.mark.parametrize(
        ("args", "name"),
        [
            ([], None),
            (["--help"], None),
            (["--version"], None),
            (["report", "--help"], "report"),
            (["-c", "x.toml", "flags", "get", "cus_1"], "flags"),
            (["--config=x.toml", "dead", "list"], "dead"),
            (["flags", "-c", "x.toml", "list"], "flags"),
            (["-c", "report"], None),  # report is the config file's name here
            (["repot"], "repot"),
        ],
    )
    def test_command_named(self, args, name):
        """The command is the first word that is neither an option nor the config file."""
        assert command_named(args) == name
