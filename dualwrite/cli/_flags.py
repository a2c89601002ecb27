"""``dualwrite flags …``: read and change customers' stages."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dualwrite.cli._common import (
    Actor,
    Reason,
    actor_name,
    app,
    console,
    flag_store,
    format_when,
    load_settings,
    parse_when,
    run_async,
)
from dualwrite.cli._cutover import cutover_ops
from dualwrite.flags import StageResolver
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.redis_client import open_redis

flags_app = typer.Typer(help="Read and change customers' migration stages.", no_args_is_help=True)
app.add_typer(flags_app, name="flags")


@flags_app.command("get")
def flags_get(ctx: typer.Context, customers: list[str]) -> None:
    """Show the stage each customer resolves to, and the rule that decided it."""
    settings = load_settings(ctx)

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

    run_async(run())


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
    settings = load_settings(ctx)

    async def run() -> None:
        async with flag_store(settings) as store:
            await store.set_override(customer, stage, actor=actor_name(actor), reason=reason)
        shown = stage.value if stage else "no override"
        console.print(f"{customer}: {shown}")

    run_async(run())


@flags_app.command("default")
def flags_default(
    ctx: typer.Context,
    stage: Annotated[Stage | None, typer.Argument(help="New default; omit to show it.")] = None,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Show or set the stage of every customer no other rule decides."""
    settings = load_settings(ctx)

    async def run() -> None:
        async with flag_store(settings) as store:
            if stage is not None:
                await store.set_default(stage, actor=actor_name(actor), reason=reason)
            console.print(f"default stage: {(await store.get_default()).value}")

    run_async(run())


@flags_app.command("rollout")
def flags_rollout(
    ctx: typer.Context,
    stage: Annotated[Stage | None, typer.Argument(help="shadow, primary or meter")] = None,
    percent: Annotated[str | None, typer.Argument(help="0-100, e.g. 25 or 25%")] = None,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Show or set the share of customers (by a stable hash) at a stage; raising it only adds."""
    settings = load_settings(ctx)
    if (stage is None) != (percent is None):
        raise typer.BadParameter("give both STAGE and PERCENT, or neither to show the rollout")

    async def run() -> None:
        async with flag_store(settings) as store:
            if stage is not None and percent is not None:
                try:
                    value = float(percent.rstrip("%"))
                except ValueError:
                    msg = f"PERCENT {percent!r} is not a number; write e.g. 25 or 12.5%"
                    raise typer.BadParameter(msg) from None
                await store.set_rollout(stage, value, actor=actor_name(actor), reason=reason)
            rollout = await store.get_rollout()
            table = Table("stage", "percent of customers")
            for name in (Stage.SHADOW, Stage.PRIMARY, Stage.METER):
                table.add_row(name.value, f"{rollout.get(name, 0.0):g} %")
            console.print(table)

    run_async(run())


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
    when = parse_when(at) if at is not None else 0
    settings = load_settings(ctx)

    async def run() -> None:
        async with flag_store(settings) as store:
            if stage is None:
                await store.clear_schedule(customer, actor=actor_name(actor), reason=reason)
                console.print(f"{customer}: schedule cleared")
                return
            await store.schedule(customer, stage, when, actor=actor_name(actor), reason=reason)
            console.print(f"{customer}: {stage.value} from {format_when(when)}")

    run_async(run())


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
    settings = load_settings(ctx)

    async def run() -> None:
        if state == "on":  # also cancels pending cutovers (their Stripe schedules released)
            async with cutover_ops(settings) as ops:
                done = await ops.kill(actor=actor_name(actor), reason=reason)
            for note in done.notes:
                console.print(f"note: {escape(note)}", highlight=False)
        async with flag_store(settings) as store:
            if state == "off":
                await store.set_kill(False, actor=actor_name(actor), reason=reason)
            on = await store.get_kill()
            console.print(
                "kill switch: [bold red]ON[/] (everyone legacy)" if on else "kill switch: off"
            )

    run_async(run())


@flags_app.command("list")
def flags_list(ctx: typer.Context) -> None:
    """List the default, rollout, kill switch, overrides and schedules."""
    settings = load_settings(ctx)

    async def run() -> None:
        async with flag_store(settings) as store:
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
                f"{stage.value} from {format_when(at)}" for at, stage in schedules.get(customer, [])
            )
            override = overrides.get(customer)
            table.add_row(customer, override.value if override else "", plan)
        console.print(table)

    run_async(run())


@flags_app.command("history")
def flags_history(
    ctx: typer.Context,
    customer: Annotated[str | None, typer.Option(help="Only changes about this customer.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """The audit log of flag changes, newest first: who, when, old, new, why."""
    settings = load_settings(ctx)

    async def run() -> None:
        async with flag_store(settings) as store:
            entries = await store.history(limit=limit, customer=customer)
        table = Table("when", "actor", "action", "customer", "old", "new", "reason")
        for entry in entries:
            table.add_row(
                format_when(entry.at),
                entry.actor,
                entry.action,
                entry.customer,
                entry.old or "",
                entry.new or "",
                entry.reason,
            )
        console.print(table)

    run_async(run())
