"""What every command shares: the Typer app, consoles, settings loading and error handling."""

from __future__ import annotations

import getpass
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from dualwrite.exceptions import ConfigError, DualwriteError, StoreUnavailableError

if TYPE_CHECKING:
    from dualwrite.config import Settings
    from dualwrite.flags import RedisFlagStore

T = TypeVar("T")

#: The sections of ``dualwrite --help``, in order; each command names its own (``PANEL``).
MIGRATE, OPERATE, INSPECT, SERVE = "Migrate", "Operate", "Inspect", "Serve"
_SECTIONS = (MIGRATE, OPERATE, INSPECT, SERVE)
_CONFIG_OPTIONS = ("-c", "--config")
#: The order of the commands in ``dualwrite --help`` (within each section).
_ORDER = (
    "flags",
    "meters",
    "backfill",
    "rollout",
    "cutover",
    "rollback",
    "config",
    "worker",
    "guard",
    "dead",
    "report",
    "reconcile",
    "durability",
    "serve",
    "demo",
    "stripe-standin",
)


class DualwriteGroup(TyperGroup):
    """The root command: ``-c/--config`` anywhere on the line, commands listed by section, and
    every value shown as what to type (``N``, ``on|off``) rather than a Python type."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in _walk(self):
            for param in command.params:
                _plain_metavar(param)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Hoist ``-c FILE`` / ``--config FILE`` given after a subcommand to the front."""
        return super().parse_args(ctx, hoist_config(args))

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The commands in sections (migrate, operate, inspect, serve), each in its order."""
        sections: dict[str, list[tuple[str, str]]] = {name: [] for name in _SECTIONS}
        names = sorted(
            self.list_commands(ctx),
            key=lambda name: _ORDER.index(name) if name in _ORDER else len(_ORDER),
        )
        commands = [(name, self.commands[name]) for name in names]
        limit = formatter.width - 6 - max((len(name) for name, _ in commands), default=0)
        for name, command in commands:
            if command.hidden:
                continue
            panel = getattr(command, "rich_help_panel", None) or OPERATE
            sections.setdefault(panel, []).append((name, command.get_short_help_str(limit)))
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _walk(command: Any) -> list[Any]:
    found = [command]
    for sub in getattr(command, "commands", {}).values():
        found += _walk(sub)
    return found


def hoist_config(args: list[str]) -> list[str]:
    """``args`` with every ``-c FILE``/``--config FILE``/``--config=FILE`` moved to the front
    (before ``--`` only), so that the root command reads it wherever it was typed."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest += args[index:]
            break
        if arg in _CONFIG_OPTIONS and index + 1 < len(args):
            front += [arg, args[index + 1]]
            index += 2
            continue
        (front if arg.startswith("--config=") else rest).append(arg)
        index += 1
    return front + rest


class _PlainArgument(TyperArgument):
    """An argument shown by its metavar alone (typer would add ``<list[str]>``)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def get_error_hint(self, ctx: Any = None) -> str:
        return f"'{self.name}'"  # the name, not the choices shown as its metavar


class UnloadedCommand(TyperCommand):
    """A command ``dualwrite --help`` lists without importing its module (issue 20: start-up).

    The command line imports the module of the command it runs, so this one runs only if that
    guess missed: it imports the module then and hands its arguments to the real command.
    """

    def __init__(self, name: str, module: str, panel: str, summary: str) -> None:
        super().__init__(
            name,
            help=summary,
            rich_help_panel=panel,
            add_help_option=False,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        )
        self.module = module

    def invoke(self, ctx: Any) -> Any:
        """Import the command's module and run the real command on the same arguments."""
        import_module(f"dualwrite.cli.{self.module}")  # deferred: start-up cost
        real = typer.main.get_command(app).commands[self.name or ""]  # type: ignore[attr-defined]
        return real.main(
            args=ctx.args, prog_name=ctx.command_path, obj=ctx.obj, standalone_mode=False
        )


def _plain_metavar(param: Any) -> None:
    """Show ``param`` as what to type: its choices, ``N``, ``NUMBER``, ``PATH`` or its name."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return
    described = getattr(param, "type_descriptor", None)
    if param.metavar is None and described is not None:
        annotation = described.annotation
        if described.is_list:
            annotation = (getattr(annotation, "__args__", None) or (str,))[0]
        if described.choices:
            param.metavar = "|".join(str(getattr(c, "value", c)) for c in described.choices)
        elif annotation is int:
            param.metavar = "N"
        elif annotation is float:
            param.metavar = "NUMBER"
        elif described.is_path:
            param.metavar = "PATH"
        else:
            param.metavar = (param.name or "value").upper()
        if isinstance(param, TyperArgument) and param.nargs != 1:
            param.metavar += "..."
    if type(param) is TyperArgument:
        param.__class__ = _PlainArgument


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dualwrite {_package_version()}")
        raise typer.Exit()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # deferred: start-up cost

    try:
        return version("dualwrite")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


app = typer.Typer(
    cls=DualwriteGroup,
    help="Move Stripe usage billing from legacy usage records to Billing Meters, customer by customer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help texts quote TOML sections ([guardrails], [[meters]]): print them as written, not as markup.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)

ConfigPath = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="DUALWRITE_CONFIG",
        help="TOML config file, before or after the command (`dualwrite config init` writes one).",
        show_default=False,
        metavar="FILE",
    ),
]
Actor = Annotated[
    str | None, typer.Option(help="Who makes the change (default: user@host).", metavar="NAME")
]
Reason = Annotated[str, typer.Option(help="Why: kept in the audit log.", metavar="TEXT")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print exactly what would change; change nothing.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def _root(
    ctx: typer.Context,
    config: ConfigPath = None,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_version
        ),
    ] = False,
) -> None:
    ctx.obj = config


def load_settings(ctx: typer.Context) -> Settings:
    """The settings for this invocation; a bad config exits 2 with the ConfigError message."""
    from dualwrite.config import Settings  # deferred: start-up cost (pydantic-settings)

    try:
        return Settings.load(ctx.obj)
    except ConfigError as exc:
        # escape(): messages name config sections like [routes], which rich would take for markup.
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a library coroutine, turning dualwrite errors into messages and exit codes."""
    import asyncio  # deferred: start-up cost (asyncio imports ssl: ~40 ms)

    try:
        return asyncio.run(coroutine)
    except StoreUnavailableError as exc:
        err_console.print(
            f"[red]error:[/red] {escape(str(exc))}. Is Redis running? Set DUALWRITE_REDIS__URL "
            "(or REDIS_URL), or \\[redis] url in the config file.",
            highlight=False,
        )
        raise typer.Exit(1) from None
    except (DualwriteError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def actor_name(actor: str | None) -> str:
    """Who makes a change: the given actor, else user@host."""
    return actor or f"{getpass.getuser()}@{socket.gethostname()}"


@asynccontextmanager
async def flag_store(settings: Settings) -> AsyncIterator[RedisFlagStore]:
    """A flag store on its own Redis connection, closed afterwards."""
    from dualwrite.stores import Stores  # deferred: start-up cost (redis)

    async with Stores.open(settings) as stores:
        yield stores.flags


def parse_when(value: str) -> int:
    """A Unix time from digits or an ISO 8601 instant (UTC unless it says otherwise)."""
    if value.isdigit():
        return int(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        msg = (
            f"--at {value!r} is not a time; give Unix seconds or ISO 8601 like 2026-12-01T00:00:00Z"
        )
        raise typer.BadParameter(msg) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def checked(parse: Callable[[], T]) -> T:
    """Parse command-line input; a ``CutoverInputError`` becomes a usage error (exit 2)."""
    from dualwrite.cutover import CutoverInputError  # deferred: start-up cost

    try:
        return parse()
    except CutoverInputError as exc:
        raise typer.BadParameter(str(exc)) from None


def customer_list(values: list[str] | None) -> list[str]:
    """Customer ids as every command takes them: separated by spaces (repeated arguments or
    options) or commas, duplicates dropped."""
    from dualwrite.cutover import parse_customers  # deferred: start-up cost

    return checked(lambda: parse_customers(",".join(values or [])))
