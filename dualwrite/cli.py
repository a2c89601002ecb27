"""The ``dualwrite`` command: flags, report, demo and the local Stripe stand-in.

Every command reads its settings once (``--config`` / ``DUALWRITE_CONFIG`` plus the environment) and
hands them to the library; the commands themselves only parse arguments and print.
"""

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
from rich.table import Table

from dualwrite.config import Settings
from dualwrite.exceptions import ConfigError, DualwriteError, StoreUnavailableError
from dualwrite.flags import RedisFlagStore, StageResolver
from dualwrite.keys import KeySpace
from dualwrite.ledger import Ledger
from dualwrite.models import Stage
from dualwrite.outbox import Outbox
from dualwrite.redis_client import open_redis
from dualwrite.report import build_report, render_table

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    help="Move Stripe usage billing from legacy usage records to Billing Meters, customer by customer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
flags_app = typer.Typer(help="Read and change customers' migration stages.", no_args_is_help=True)
app.add_typer(flags_app, name="flags")

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


def _settings(ctx: typer.Context) -> Settings:
    try:
        return Settings.load(ctx.obj)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coroutine)
    except StoreUnavailableError as exc:
        err_console.print(
            f"[red]error:[/red] {exc}. Is Redis running? Set DUALWRITE_REDIS__URL (or REDIS_URL), "
            "or [redis] url in the config file.",
            highlight=False,
        )
        raise typer.Exit(1) from None
    except (DualwriteError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _actor(actor: str | None) -> str:
    return actor or f"{getpass.getuser()}@{socket.gethostname()}"


@asynccontextmanager
async def _flag_store(settings: Settings) -> AsyncIterator[RedisFlagStore]:
    redis = open_redis(settings.redis)
    try:
        yield RedisFlagStore(redis, KeySpace(settings.redis.key_prefix, settings.redis.shards))
    finally:
        await redis.aclose()


def _parse_when(value: str) -> int:
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


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ----------------------------------------------------------------------------------------- flags


@flags_app.command("get")
def flags_get(ctx: typer.Context, customers: list[str]) -> None:
    """Show the stage each customer resolves to, and the rule that decided it."""
    settings = _settings(ctx)

    async def run() -> None:
        redis = open_redis(settings.redis)
        keys = KeySpace(settings.redis.key_prefix, settings.redis.shards)
        resolver = StageResolver(redis, keys, settings.flags)
        try:
            table = Table("customer", "stage", "decided by", "detail")
            for customer in customers:
                resolution = await resolver.explain(customer)
                table.add_row(
                    customer, resolution.stage.value, resolution.reason, resolution.detail
                )
            console.print(table)
        finally:
            await redis.aclose()

    _run(run())


@flags_app.command("set")
def flags_set(
    ctx: typer.Context,
    customer: str,
    stage: Annotated[Stage | None, typer.Argument(help="legacy, shadow, primary or meter")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the override.")] = False,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Pin one customer to a stage (an override beats schedules, rollouts and the default)."""
    if (stage is None) == (not clear):
        raise typer.BadParameter("give a STAGE, or --clear to remove the override")
    settings = _settings(ctx)

    async def run() -> None:
        async with _flag_store(settings) as store:
            await store.set_override(customer, stage, actor=_actor(actor), reason=reason)
        shown = stage.value if stage else "no override"
        console.print(f"{customer}: {shown}")

    _run(run())


@flags_app.command("default")
def flags_default(
    ctx: typer.Context,
    stage: Annotated[Stage | None, typer.Argument(help="New default; omit to show it.")] = None,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Show or set the stage of every customer no other rule decides."""
    settings = _settings(ctx)

    async def run() -> None:
        async with _flag_store(settings) as store:
            if stage is not None:
                await store.set_default(stage, actor=_actor(actor), reason=reason)
            console.print(f"default stage: {(await store.get_default()).value}")

    _run(run())


@flags_app.command("rollout")
def flags_rollout(
    ctx: typer.Context,
    stage: Annotated[Stage | None, typer.Argument(help="shadow, primary or meter")] = None,
    percent: Annotated[str | None, typer.Argument(help="0-100, e.g. 25 or 25%")] = None,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Show or set the share of customers (by a stable hash) at a stage; raising it only adds."""
    settings = _settings(ctx)
    if (stage is None) != (percent is None):
        raise typer.BadParameter("give both STAGE and PERCENT, or neither to show the rollout")

    async def run() -> None:
        async with _flag_store(settings) as store:
            if stage is not None and percent is not None:
                try:
                    value = float(percent.rstrip("%"))
                except ValueError:
                    msg = f"PERCENT {percent!r} is not a number; write e.g. 25 or 12.5%"
                    raise typer.BadParameter(msg) from None
                await store.set_rollout(stage, value, actor=_actor(actor), reason=reason)
            rollout = await store.get_rollout()
            table = Table("stage", "percent of customers")
            for name in (Stage.SHADOW, Stage.PRIMARY, Stage.METER):
                table.add_row(name.value, f"{rollout.get(name, 0.0):g} %")
            console.print(table)

    _run(run())


@flags_app.command("schedule")
def flags_schedule(
    ctx: typer.Context,
    customer: str,
    stage: Annotated[Stage | None, typer.Argument(help="Stage from --at on.")] = None,
    at: Annotated[str | None, typer.Option(help="When: Unix seconds or ISO 8601 (UTC).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the customer's schedule.")] = False,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Move a customer to a stage at a given time (normally its billing period's end)."""
    if clear:
        if stage is not None or at is not None:
            raise typer.BadParameter("--clear takes no STAGE or --at")
    elif stage is None or at is None:
        raise typer.BadParameter("give both STAGE and --at (or --clear)")
    when = _parse_when(at) if at is not None else 0
    settings = _settings(ctx)

    async def run() -> None:
        async with _flag_store(settings) as store:
            if stage is None:
                await store.clear_schedule(customer, actor=_actor(actor), reason=reason)
                console.print(f"{customer}: schedule cleared")
                return
            await store.schedule(customer, stage, when, actor=_actor(actor), reason=reason)
            console.print(f"{customer}: {stage.value} from {_when(when)}")

    _run(run())


@flags_app.command("kill")
def flags_kill(
    ctx: typer.Context,
    state: Annotated[str, typer.Argument(help="on, off or status")] = "status",
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """The kill switch: `on` sends every customer back to legacy at once."""
    if state not in ("on", "off", "status"):
        raise typer.BadParameter("STATE must be on, off or status")
    settings = _settings(ctx)

    async def run() -> None:
        async with _flag_store(settings) as store:
            if state != "status":
                await store.set_kill(state == "on", actor=_actor(actor), reason=reason)
            on = await store.get_kill()
            console.print(
                "kill switch: [bold red]ON[/] (everyone legacy)" if on else "kill switch: off"
            )

    _run(run())


@flags_app.command("list")
def flags_list(ctx: typer.Context) -> None:
    """List the default, rollout, kill switch, overrides and schedules."""
    settings = _settings(ctx)

    async def run() -> None:
        async with _flag_store(settings) as store:
            default, rollout, kill = (
                await store.get_default(),
                await store.get_rollout(),
                await store.get_kill(),
            )
            overrides, schedules = await store.overrides(), await store.schedules()
        console.print(f"default: {default.value}   kill switch: {'ON' if kill else 'off'}")
        console.print(
            "rollout: "
            + ", ".join(
                f"{s.value} {rollout.get(s, 0.0):g} %"
                for s in (Stage.SHADOW, Stage.PRIMARY, Stage.METER)
            )
        )
        table = Table("customer", "override", "schedule")
        for customer in sorted(set(overrides) | set(schedules)):
            plan = ", ".join(
                f"{stage.value} from {_when(at)}" for at, stage in schedules.get(customer, [])
            )
            override = overrides.get(customer)
            table.add_row(customer, override.value if override else "", plan)
        console.print(table)

    _run(run())


@flags_app.command("history")
def flags_history(
    ctx: typer.Context,
    customer: Annotated[str | None, typer.Option(help="Only changes about this customer.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """The audit log of flag changes, newest first: who, when, old, new, why."""
    settings = _settings(ctx)

    async def run() -> None:
        async with _flag_store(settings) as store:
            entries = await store.history(limit=limit, customer=customer)
        table = Table("when", "actor", "action", "customer", "old", "new", "reason")
        for entry in entries:
            table.add_row(
                _when(entry.at),
                entry.actor,
                entry.action,
                entry.customer,
                entry.old or "",
                entry.new or "",
                entry.reason,
            )
        console.print(table)

    _run(run())


# ---------------------------------------------------------------------------------------- report


@app.command("report")
def report(
    ctx: typer.Context,
    customer: Annotated[str | None, typer.Option(help="Only this customer.")] = None,
    stage: Annotated[Stage | None, typer.Option(help="Only customers now at this stage.")] = None,
    since: Annotated[str | None, typer.Option(help="First period (YYYY-MM-DD, UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="Last period (YYYY-MM-DD, UTC).")] = None,
    divergent: Annotated[
        bool, typer.Option("--divergent", help="Only diverged customers.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per customer: stage, totals on each leg, difference, failures, and the divergent events."""
    settings = _settings(ctx)
    for name, value in (("--since", since), ("--until", until)):
        if value is not None:
            try:
                datetime.strptime(value, "%Y-%m-%d")
            except ValueError:
                raise typer.BadParameter(f"{name} {value!r}: write a day as YYYY-MM-DD") from None

    async def run() -> None:
        redis = open_redis(settings.redis)
        keys = KeySpace(settings.redis.key_prefix, settings.redis.shards)
        try:
            ledger = Ledger(redis, keys)
            resolver = StageResolver(redis, keys, settings.flags)
            outbox = Outbox(redis, keys, settings.outbox, ledger)
            result = await build_report(
                ledger,
                resolver,
                outbox=outbox,
                since=since,
                until=until,
                customer=customer,
                stage=stage,
                only_divergent=divergent,
            )
        finally:
            await redis.aclose()
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
        else:
            console.print(render_table(result))

    _run(run())


# ------------------------------------------------------------------------------ demo and stand-in


@app.command("demo")
def demo(
    ctx: typer.Context,
    customers: Annotated[int, typer.Option(min=1, max=200, help="Customers per stage.")] = 3,
    events: Annotated[int, typer.Option(min=1, max=100_000, help="Usage requests to send.")] = 400,
    seed: Annotated[int, typer.Option(help="Seed for traffic and injected faults.")] = 7,
) -> None:
    """Run the whole dual write on an embedded default: Redis, a local Stripe stand-in, traffic for
    customers in every stage, injected refusals, then the report."""
    from dualwrite.demo import DemoOptions, run_demo

    settings = _settings(ctx)
    options = DemoOptions(customers_per_stage=customers, events=events, seed=seed)
    _run(run_demo(settings, options, console=console))


@app.command("stripe-standin")
def stripe_standin(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 12111,
    seed: Annotated[int, typer.Option(help="Seed for injected faults.")] = 0,
) -> None:
    """Serve the local Stripe stand-in (usage records, meters, meter events) for tests and demos."""
    from dualwrite.testing import StripeStandin, run_standin

    console.print(
        f"Stripe stand-in on http://{host}:{port} (any sk_test_ key; /_standin/ controls)"
    )
    run_standin(StripeStandin(seed=seed), host, port)


def main() -> None:
    """Console-script entry point."""
    app()
