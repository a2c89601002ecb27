"""``dualwrite config init|check``: write the config template, and check a configuration.

``init`` writes the template shipped in the package (every key, its default and what it does;
``dualwrite.config_template``). ``check`` loads the file and the environment as every command
does, names environment variables that set nothing (with the closest real one), then tries Redis
and Stripe with reads only, prints what it found, and exits 0 when nothing is wrong, 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import BaseModel, Field
from rich.markup import escape

from dualwrite.cli._common import OPERATE, AsJson, app, console, err_console, run_async
from dualwrite.exceptions import ConfigError, DualwriteError
from dualwrite.redaction import redact

if TYPE_CHECKING:
    from dualwrite.config import Settings

config_app = typer.Typer(
    help="Write a config file with every key, or check a configuration.", no_args_is_help=True
)
app.add_typer(config_app, name="config", rich_help_panel=OPERATE)

#: Exit status of ``config check``: everything checked is usable.
CHECK_OK = 0
#: Exit status of ``config check``: at least one problem (each printed with its fix).
CHECK_FAILED = 1


#: Variables that are not ``<SECTION>__<KEY>`` settings but mean something to dualwrite.
@config_app.command("init")
def config_init(
    path: Annotated[
        str,
        typer.Argument(help="Where to write it; - prints it.", metavar="PATH"),
    ] = "dualwrite.toml",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a config file holding every key with its default and what it does (the
    sections that map meters, routes and items as commented-out examples)."""
    from dualwrite.config_template import packaged_template  # deferred: start-up cost

    text = packaged_template()
    if path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    if target.exists() and not force:
        err_console.print(
            f"[red]error:[/red] {escape(path)} exists; give another PATH, or --force to "
            "overwrite it",
            highlight=False,
        )
        raise typer.Exit(1)
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        err_console.print(
            f"[red]error:[/red] cannot write {escape(path)} ({exc.strerror})", highlight=False
        )
        raise typer.Exit(1) from None
    console.print(
        f"wrote {escape(path)}: edit it, then `dualwrite -c {escape(path)} config check`",
        highlight=False,
    )


class CheckItem(BaseModel):
    """One thing ``config check`` looked at."""

    name: str
    ok: bool
    found: str
    fix: str = ""


class CheckReport(BaseModel):
    """Everything ``config check`` found (``--json``)."""

    config_file: str | None
    items: list[CheckItem] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return all(item.ok for item in self.items)


def _environment(report: CheckReport) -> None:
    from dualwrite.config import unknown_variables  # deferred: start-up cost

    for name, guess in unknown_variables():
        fix = f"did you mean {guess}?" if guess else "remove it (dualwrite reads no such variable)"
        report.items.append(CheckItem(name=name, ok=False, found="sets nothing", fix=fix))


async def _redis(settings: Settings, report: CheckReport) -> None:
    # deferred: start-up cost
    from dualwrite.redis_client import store_errors
    from dualwrite.stores import Stores

    stores = Stores.open(settings, max_connections=2)
    redis = stores.redis
    where = _mask(settings.redis.url)
    try:
        async with store_errors("checking Redis"):
            await redis.ping()
            server = _first(await redis.info("server"))
            persistence = _first(await redis.info("persistence"))
            memory = _first(await redis.info("memory"))
    except DualwriteError as exc:
        report.items.append(
            CheckItem(
                name="redis",
                ok=False,
                found=f"{where} does not answer ({exc})",
                fix="start Redis, or set [redis] url / DUALWRITE_REDIS__URL",
            )
        )
        return
    finally:
        await stores.aclose()
    aof = str(persistence.get("aof_enabled", "?"))
    policy = str(memory.get("maxmemory_policy", "?"))
    report.items.append(
        CheckItem(
            name="redis",
            ok=True,
            found=f"{where} answers (Redis {server.get('redis_version', '?')}), key prefix "
            f"{settings.redis.key_prefix!r}, appendonly {'yes' if aof == '1' else 'no'}, "
            f"maxmemory-policy {policy}",
        )
    )
    if aof != "1":
        report.warnings.append(
            "Redis keeps no append-only file: a restart can lose usage dualwrite recorded "
            "(set appendonly yes)"
        )
    if policy not in ("noeviction", "?"):
        report.warnings.append(
            f"Redis evicts keys under memory pressure ({policy}): set maxmemory-policy "
            "noeviction, dualwrite's state is a database, not a cache"
        )


async def _stripe(settings: Settings, report: CheckReport) -> None:
    from dualwrite.stripe_io import AccountStripe  # deferred: start-up cost (stripe)

    key = settings.stripe_api_key_value()
    base = settings.stripe.api_base
    if key is None:
        report.items.append(
            CheckItem(
                name="stripe",
                ok=False,
                found="STRIPE_API_KEY is not set",
                fix="export STRIPE_API_KEY (the middleware, workers and operator commands "
                "write and read with it; the proxy forwards its callers' keys)",
            )
        )
        return
    mode = "live" if key.startswith(("sk_live_", "rk_live_")) else "test"
    try:
        async with AccountStripe(settings.stripe, api_key=key) as stripe:
            meters = [m async for m in stripe.list_all("/v1/billing/meters", pinned=False)]
    except DualwriteError as exc:
        report.items.append(
            CheckItem(
                name="stripe",
                ok=False,
                found=f"{base} refused a read with {redact(key)} ({mode} mode): {redact(str(exc))}",
                fix="check STRIPE_API_KEY and [stripe] api_base",
            )
        )
        return
    names = {str(m.get("event_name")): str(m.get("id")) for m in meters}
    report.items.append(
        CheckItem(
            name="stripe",
            ok=True,
            found=f"{base} answers {redact(key)} ({mode} mode): {len(meters)} meter(s)",
        )
    )
    for meter in settings.meters:
        found = names.get(meter.event_name)
        report.items.append(
            CheckItem(
                name=f"meter {meter.event_name}",
                ok=found is not None,
                found=f"in Stripe ({found})" if found else "no meter with this event name",
                fix="" if found else "`dualwrite meters plan`, then `meters apply` creates it",
            )
        )


def _first(info: Any) -> dict[str, Any]:
    """An INFO reply as one server's fields (a cluster answers per node: the first)."""
    data = dict(info or {})
    if data and all(isinstance(value, dict) for value in data.values()):
        return dict(next(iter(data.values())))
    return data


def _mask(url: str) -> str:
    """A Redis URL without its password."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://****@{tail}"


@config_app.command("check")
def config_check(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Validate the config file (-c/--config or DUALWRITE_CONFIG) and the environment, then try
    Redis and Stripe with reads only, and print what was found.

    Exit status: 0 everything usable, 1 a problem (each printed with its fix).
    """
    from dualwrite.config import Settings  # deferred: start-up cost (pydantic-settings)

    path = ctx.obj
    report = CheckReport(config_file=str(path) if path else None)
    _environment(report)
    try:
        settings = Settings.load(path)
    except ConfigError as exc:
        report.items.append(
            CheckItem(name="settings", ok=False, found=str(exc), fix="see each key's fix above")
        )
        settings = None
    if settings is not None:
        report.items.append(CheckItem(name="settings", ok=True, found="valid"))

        async def probe() -> None:
            await _redis(settings, report)
            await _stripe(settings, report)

        run_async(probe())
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        _print(report)
    raise typer.Exit(CHECK_OK if report.ok else CHECK_FAILED)


def _print(report: CheckReport) -> None:
    source = report.config_file or "none (defaults and the environment)"
    console.print(f"config file: {escape(source)}", highlight=False)
    for item in report.items:
        mark = "[green]ok[/green]     " if item.ok else "[red]problem[/red]"
        console.print(f"{mark} {escape(item.name)}: {escape(item.found)}", highlight=False)
        if item.fix:
            console.print(f"        fix: {escape(item.fix)}", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning[/yellow] {escape(warning)}", highlight=False)
    problems = sum(1 for item in report.items if not item.ok)
    console.print(
        "everything checked is usable" if not problems else f"{problems} problem(s)",
        highlight=False,
    )
