"""The ``dualwrite`` command.

Every command reads its settings once (``--config`` / ``DUALWRITE_CONFIG`` plus the environment) and
hands them to the library; the commands themselves only parse arguments and print. One module per
group of commands: ``_flags`` (stages), ``_report``, ``_reconcile``, ``_ops`` (worker, dead
letters), ``_serve`` (serve, demo, the stand-in), ``_meters`` (meters plan|apply),
``_backfill``, ``_cutover`` (rollout, cutover, rollback, guard), ``_config`` (config init|check),
``_durability`` (Redis's settings and data-loss record).
``_common`` also holds the conventions every command follows: ``-c/--config`` before or after
the command, ``-h``, ``--version``, commands listed by section, values shown as what to type.

Start-up (issue 20): the command line imports only the module of the command it runs. ``dualwrite
--help`` lists the others from ``COMMANDS`` (a test keeps that table equal to the real commands),
so neither pays for stripe, the engine or the report. ``from dualwrite.cli import app`` still
gives the whole application, every command registered.
"""

from __future__ import annotations

import sys
import typing
from importlib import import_module

if typing.TYPE_CHECKING:
    import typer
    from typer.core import TyperGroup

__all__ = ["COMMANDS", "app", "main"]


class CommandEntry(typing.NamedTuple):
    """A command as ``dualwrite --help`` lists it, and the module that registers it."""

    module: str
    panel: str
    summary: str


#: Every top-level command: its module under ``dualwrite.cli``, its section and its summary.
COMMANDS: dict[str, CommandEntry] = {
    "backfill": CommandEntry(
        "_backfill",
        "Migrate",
        "Replay usage already reported to the legacy path as meter events, within Stripe's 35 days.",
    ),
    "rollout": CommandEntry(
        "_cutover",
        "Migrate",
        "Move a percentage of customers, or named ones, to STAGE (one stage forward at a time).",
    ),
    "cutover": CommandEntry(
        "_cutover",
        "Migrate",
        "Move one customer to a stage at its billing period's end (or now, or a given time).",
    ),
    "rollback": CommandEntry(
        "_cutover",
        "Migrate",
        "Send customers (or --all) back one stage, at once: pinned by override, schedules cleared.",
    ),
    "guard": CommandEntry(
        "_cutover",
        "Operate",
        "Roll back customers (or the rollout) whose divergence crossed the guardrails.",
    ),
    "durability": CommandEntry(
        "_durability",
        "Inspect",
        "Show Redis's persistence and eviction settings (each master of a cluster) as `serve` and "
        "`worker` check them at start, and the data loss dualwrite's markers recorded, if any.",
    ),
    "worker": CommandEntry(
        "_ops",
        "Operate",
        "Deliver shadow writes from the outbox until stopped (SIGTERM/SIGINT finish the batch in "
        "hand).",
    ),
    "reconcile": CommandEntry(
        "_reconcile",
        "Inspect",
        "Read Stripe's own totals for a period (legacy usage record summaries, meter event "
        "summaries) and compare them, per customer and meter event name, with what dualwrite "
        "intended and what it believes Stripe accepted.",
    ),
    "report": CommandEntry(
        "_report",
        "Inspect",
        "Per customer: stage, totals on each leg, difference, failures by code, the latest "
        "divergent events, and whether it is ready for its next stage (the rule is printed with "
        "the table).",
    ),
    "demo": CommandEntry(
        "_serve",
        "Serve",
        "Run the whole dual write on an embedded default: Redis, a local Stripe stand-in, traffic "
        "for customers in every stage, injected refusals, then the report.",
    ),
    "stripe-standin": CommandEntry(
        "_serve",
        "Serve",
        "Serve the local Stripe stand-in (usage records, meters, meter events) for tests and demos.",
    ),
    "serve": CommandEntry(
        "_serve",
        "Serve",
        "Serve the Stripe proxy: point any Stripe SDK's API base here; usage records are "
        "dual-written, everything else goes to Stripe untouched.",
    ),
    "config": CommandEntry(
        "_config", "Operate", "Write a config file with every key, or check a configuration."
    ),
    "flags": CommandEntry("_flags", "Migrate", "Read and change customers' migration stages."),
    "meters": CommandEntry(
        "_meters",
        "Migrate",
        "Billing meters for the legacy metered prices: plan what to create, then apply it.",
    ),
    "dead": CommandEntry(
        "_ops",
        "Operate",
        "Shadow writes Stripe refused for good, or that expired: list, show, retry, drop.",
    ),
}


def load_commands(names: typing.Iterable[str] | None = None) -> None:
    """Import the modules that register ``names`` (every command when ``None``) on the app."""
    wanted = COMMANDS if names is None else [name for name in names if name in COMMANDS]
    for module in sorted({COMMANDS[name].module for name in wanted}):
        import_module(f"dualwrite.cli.{module}")  # deferred: start-up cost


def command_named(args: list[str]) -> str | None:
    """The command a command line runs (``None`` for ``dualwrite``, ``--help`` or ``--version``)."""
    from dualwrite.cli._common import hoist_config  # deferred: start-up cost

    args = hoist_config(args)
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("-c", "--config"):
            index += 2
            continue
        if arg == "--":
            return args[index + 1] if index + 1 < len(args) else None
        if not arg.startswith("-"):
            return arg
        index += 1
    return None


def root_command(args: list[str]) -> TyperGroup:
    """The root click group for ``args``: the command it runs fully loaded, every other command
    listed by name, section and summary only."""
    import typer.main  # deferred: start-up cost

    from dualwrite.cli._common import UnloadedCommand, app as bare_app  # deferred: start-up cost

    load_commands([name] if (name := command_named(args)) is not None else [])
    group = typing.cast("TyperGroup", typer.main.get_command(bare_app))
    for name, entry in COMMANDS.items():
        if name not in group.commands:
            group.add_command(UnloadedCommand(name, entry.module, entry.panel, entry.summary))
    return group


def main() -> None:
    """Console-script entry point."""
    root_command(sys.argv[1:]).main(prog_name="dualwrite")


def __getattr__(name: str) -> typer.Typer:
    # ``app`` with every command registered, for tests, the docs' reference and library users.
    if name != "app":
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    load_commands()
    from dualwrite.cli._common import app  # deferred: start-up cost

    return app
