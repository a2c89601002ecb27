"""What every command shares: the Typer app, consoles, settings loading and error handling."""

from __future__ import annotations

import asyncio
import getpass
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from dualwrite.config import Settings
from dualwrite.exceptions import ConfigError, DualwriteError, StoreUnavailableError
from dualwrite.flags import RedisFlagStore
from dualwrite.keys import KeySpace
from dualwrite.redis_client import open_redis

T = TypeVar("T")

app = typer.Typer(
    help="Move Stripe usage billing from legacy usage records to Billing Meters, customer by customer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help texts quote TOML sections ([guardrails], [[meters]]): print them as written, not as markup.
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)

ConfigPath = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="DUALWRITE_CONFIG",
        help="TOML config file (see config/dualwrite.toml).",
        show_default=False,
    ),
]
Actor = Annotated[str | None, typer.Option(help="Who makes the change (default: user@host).")]
Reason = Annotated[str, typer.Option(help="Why: kept in the audit log.")]


@app.callback()
def _root(ctx: typer.Context, config: ConfigPath = None) -> None:
    ctx.obj = config


def load_settings(ctx: typer.Context) -> Settings:
    """The settings for this invocation; a bad config exits 2 with the ConfigError message."""
    try:
        return Settings.load(ctx.obj)
    except ConfigError as exc:
        # escape(): messages name config sections like [routes], which rich would take for markup.
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a library coroutine, turning dualwrite errors into messages and exit codes."""
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
    redis = open_redis(settings.redis)
    try:
        yield RedisFlagStore(redis, KeySpace(settings.redis.key_prefix, settings.redis.shards))
    finally:
        await redis.aclose()


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


def format_when(ts: float) -> str:
    """A Unix time as UTC text."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
