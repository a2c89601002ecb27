"""``dualwrite flags …``: read and change customers' stages.

Every change follows the cutover rules (``dualwrite.cutover``): one stage forward at a time unless
``--force``, a move back is a rollback, nothing in the past; ``--dry-run`` shows the change.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, TypeAdapter
from rich.markup import escape
from rich.table import Table

from dualwrite.cli._common import (
    MIGRATE,
    Actor,
    AsJson,
    DryRun,
    Reason,
    actor_name,
    app,
    checked,
    console,
    customer_list,
    flag_store,
    load_settings,
    parse_when,
    run_async,
)
from dualwrite.cli._cutover import cutover_ops, print_result
from dualwrite.cutover import (
    OperationResult,
    clear_override,
    parse_percent,
    schedule_stage,
    set_default,
)
from dualwrite.flags import (
    ROLLOUT_STAGES,
    AuditEntry,
    Resolution,
    resolve_snapshot,
)
from dualwrite.models import Stage, utc_time
from dualwrite.stores import Stores
from dualwrite.test_clocks import customer_now, stripe_test_clocks

flags_app = typer.Typer(help="Read and change customers' migration stages.", no_args_is_help=True)
app.add_typer(flags_app, name="flags", rich_help_panel=MIGRATE)

StageArg = Annotated[
    Stage | None,
    typer.Argument(case_sensitive=False, help="The stage (any case)."),
]
Force = Annotated[
    bool,
    typer.Option("--force", help="Allow a move of more than one stage forward, or back."),
]


class _FlagsView(BaseModel):
    """``flags list --json``: every flag."""

    default: Stage
    kill: bool
    rollout: dict[str, float]
    overrides: dict[str, Stage]
    schedules: dict[str, list[dict[str, Any]]]


def _show(result: OperationResult, line: str) -> None:
    """A dry run in full (what would change); a change as ``line`` and its notes."""
    if result.dry_run or not result.changes:
        print_result(result)
        return
    console.print(line, highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)


@flags_app.command("get")
def flags_get(
    ctx: typer.Context,
    customers: Annotated[
        list[str], typer.Argument(help="Customer ids, separated by spaces or commas.")
    ],
    as_json: AsJson = False,
) -> None:
    """Show the stage each customer resolves to, and the rule that decided it."""
    names = customer_list(customers)
    settings = load_settings(ctx)

    async def run() -> list[Resolution]:
        clocks = stripe_test_clocks(settings)
        async with Stores.open(settings) as stores:
            store = stores.flags
            found = []
            for customer in names:
                snapshot = await store.snapshot(customer)  # raises when Redis is down
                clock = snapshot.billing.test_clock
                now = await customer_now(clock, clocks, time.time())
                resolution = resolve_snapshot(
                    customer, snapshot, now=now, salt=settings.flags.rollout_salt
                )
                if clock is not None:
                    # Judged by the customer's Stripe test clock, as the engine judges it.
                    judged = (
                        f"judged at its test clock {clock}'s {utc_time(int(now))}"
                        if clocks is not None
                        else f"on test clock {clock}, judged by this host's clock: set "
                        "STRIPE_API_KEY to read the clock"
                    )
                    resolution = resolution.model_copy(
                        update={"detail": f"{resolution.detail} ({judged})"}
                    )
                found.append(resolution)
            return found

    found = run_async(run())
    if as_json:
        rows = [
            {"customer": c, **r.model_dump(mode="json")} for c, r in zip(names, found, strict=True)
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("customer", "stage", "decided by", "detail")
    for customer, resolution in zip(names, found, strict=True):
        table.add_row(customer, resolution.stage.value, resolution.reason, resolution.detail)
    console.print(table)


@flags_app.command("set")
def flags_set(
    ctx: typer.Context,
    customer: str,
    stage: StageArg = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the override.")] = False,
    force: Force = False,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Pin one customer to a stage, one stage forward (an override beats schedules, rollouts and
    the default); moving back is `dualwrite rollback`."""
    if (stage is None) == (not clear):
        raise typer.BadParameter("give a STAGE, or --clear to remove the override")
    settings = load_settings(ctx)
    who = actor_name(actor)

    async def run() -> OperationResult:
        async with cutover_ops(settings) as ops:
            if stage is None:
                return await clear_override(
                    ops, customer, actor=who, reason=reason, force=force, dry_run=dry_run
                )
            return await ops.move_customers(
                [customer], stage, actor=who, reason=reason, force=force, dry_run=dry_run
            )

    result = run_async(run())
    _show(result, f"{customer}: {stage.value if stage else 'no override'}")


@flags_app.command("default")
def flags_default(
    ctx: typer.Context,
    stage: Annotated[
        Stage | None,
        typer.Argument(case_sensitive=False, help="New default (any case); omit to show it."),
    ] = None,
    force: Force = False,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: AsJson = False,
) -> None:
    """Show or set the stage of every customer no other rule decides (one stage forward at a
    time: every such customer moves at once)."""
    settings = load_settings(ctx)

    async def run() -> tuple[Stage, OperationResult | None]:
        async with cutover_ops(settings) as ops:
            result = None
            if stage is not None:
                result = await set_default(
                    ops,
                    stage,
                    actor=actor_name(actor),
                    reason=reason,
                    force=force,
                    dry_run=dry_run,
                )
            return await ops.store.get_default(), result

    default, result = run_async(run())
    if as_json:
        typer.echo(json.dumps({"default": default.value}))
    elif result is not None and (result.dry_run or not result.changes):
        print_result(result)
    else:
        console.print(f"default stage: {default.value}")


@flags_app.command("rollout")
def flags_rollout(
    ctx: typer.Context,
    stage: Annotated[
        Stage | None, typer.Argument(case_sensitive=False, help="shadow, primary or meter.")
    ] = None,
    percent: Annotated[
        str | None, typer.Argument(help="0-100, e.g. 25 or 25%.", metavar="PERCENT")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Allow lowering a percentage (moves customers back).")
    ] = False,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: AsJson = False,
) -> None:
    """Show or set the share of customers (by a stable hash) at a stage; raising it only adds
    customers, and only from the stage before (`dualwrite rollout` does the same)."""
    settings = load_settings(ctx)
    if (stage is None) != (percent is None):
        raise typer.BadParameter("give both STAGE and PERCENT, or neither to show the rollout")
    share = checked(lambda: parse_percent(percent)) if percent is not None else None

    async def run() -> tuple[dict[Stage, float], OperationResult | None]:
        async with cutover_ops(settings) as ops:
            result = None
            if stage is not None and share is not None:
                result = await ops.rollout_percent(
                    stage,
                    share,
                    actor=actor_name(actor),
                    reason=reason,
                    force=force,
                    dry_run=dry_run,
                )
            return await ops.store.get_rollout(), result

    rollout, result = run_async(run())
    shares = {name.value: rollout.get(name, 0.0) for name in ROLLOUT_STAGES}
    if as_json:
        typer.echo(json.dumps(shares))
        return
    if result is not None and result.dry_run:
        print_result(result)
        return
    table = Table("stage", "percent of customers")
    for name, value in shares.items():
        table.add_row(name, f"{value:g} %")
    console.print(table)


@flags_app.command("schedule")
def flags_schedule(
    ctx: typer.Context,
    customer: str,
    stage: StageArg = None,
    at: Annotated[
        str | None,
        typer.Option(
            help="When: ISO 8601 (UTC unless it says), Unix seconds, or now.", metavar="TIME"
        ),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the customer's schedule.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Allow a time in the past (applies at once) or a jump of stages."
        ),
    ] = False,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Move a customer to a stage at a given time (normally its billing period's end); one stage
    forward from where it will be then, and never in the past."""
    if clear:
        if stage is not None or at is not None:
            raise typer.BadParameter("--clear takes no STAGE or --at")
    elif stage is None or at is None:
        raise typer.BadParameter("give both STAGE and --at (or --clear)")
    when = None if at in (None, "now") else parse_when(at)
    settings = load_settings(ctx)
    who = actor_name(actor)

    async def run() -> OperationResult | None:
        async with cutover_ops(settings) as ops:
            if stage is None:
                if not dry_run:
                    await ops.store.clear_schedule(customer, actor=who, reason=reason)
                return None
            return await schedule_stage(
                ops, customer, stage, when, actor=who, reason=reason, force=force, dry_run=dry_run
            )

    result = run_async(run())
    if result is None:
        verb = "would be cleared (dry run: nothing was changed)" if dry_run else "cleared"
        console.print(f"{customer}: schedule {verb}")
        return
    assert stage is not None
    _show(result, f"{customer}: {stage.value} from {'now' if when is None else utc_time(when)}")


@flags_app.command("kill")
def flags_kill(
    ctx: typer.Context,
    state: Annotated[
        Literal["on", "off", "status"],
        typer.Argument(help="on: every customer legacy at once; off; status (the default)."),
    ] = "status",
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: AsJson = False,
) -> None:
    """The kill switch: `on` sends every customer back to legacy at once."""
    settings = load_settings(ctx)

    async def run() -> tuple[bool, OperationResult | None]:
        result = None
        async with cutover_ops(settings) as ops:
            if state == "on":  # also cancels pending cutovers (their Stripe schedules released)
                result = await ops.kill(actor=actor_name(actor), reason=reason, dry_run=dry_run)
            elif state == "off" and not dry_run:
                await ops.store.set_kill(False, actor=actor_name(actor), reason=reason)
            return await ops.store.get_kill(), result

    on, result = run_async(run())
    if as_json:
        typer.echo(json.dumps({"kill": on}))
        return
    if dry_run and state != "status":
        if result is not None:
            print_result(result)
        else:
            console.print("would turn the kill switch off (dry run: nothing was changed)")
        return
    for note in result.notes if result else []:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print("kill switch: [bold red]ON[/] (everyone legacy)" if on else "kill switch: off")


@flags_app.command("list")
def flags_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List the default, rollout, kill switch, overrides and schedules."""
    settings = load_settings(ctx)

    async def run() -> _FlagsView:
        async with flag_store(settings) as store:
            rollout = await store.get_rollout()
            return _FlagsView(
                default=await store.get_default(),
                kill=await store.get_kill(),
                rollout={s.value: rollout.get(s, 0.0) for s in ROLLOUT_STAGES},
                overrides=await store.overrides(),
                schedules={
                    customer: [{"at": utc_time(at), "stage": stage.value} for at, stage in entries]
                    for customer, entries in (await store.schedules()).items()
                },
            )

    view = run_async(run())
    if as_json:
        typer.echo(view.model_dump_json(indent=2))
        return
    console.print(f"default: {view.default.value}   kill switch: {'ON' if view.kill else 'off'}")
    console.print(
        "rollout: " + ", ".join(f"{name} {share:g} %" for name, share in view.rollout.items())
    )
    table = Table("customer", "override", "schedule")
    for customer in sorted(set(view.overrides) | set(view.schedules)):
        plan = ", ".join(
            f"{entry['stage']} from {entry['at']}" for entry in view.schedules.get(customer, [])
        )
        override = view.overrides.get(customer)
        table.add_row(customer, override.value if override else "", plan)
    console.print(table)


@flags_app.command("history")
def flags_history(
    ctx: typer.Context,
    customer: Annotated[str | None, typer.Option(help="Only changes about this customer.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: AsJson = False,
) -> None:
    """The audit log of flag changes, newest first: who, when, old, new, why."""
    settings = load_settings(ctx)

    async def run() -> list[AuditEntry]:
        async with flag_store(settings) as store:
            return await store.history(limit=limit, customer=customer)

    entries = run_async(run())
    if as_json:
        typer.echo(TypeAdapter(list[AuditEntry]).dump_json(entries, indent=2).decode())
        return
    table = Table("when", "actor", "action", "customer", "old", "new", "reason")
    for entry in entries:
        table.add_row(
            utc_time(entry.at),
            entry.actor,
            entry.action,
            entry.customer,
            entry.old or "",
            entry.new or "",
            entry.reason,
        )
    console.print(table)
