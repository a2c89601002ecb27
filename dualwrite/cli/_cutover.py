"""``dualwrite rollout``, ``cutover``, ``rollback`` and ``guard``: moving customers between stages."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import BaseModel
from rich.markup import escape

from dualwrite.cli._common import (
    MIGRATE,
    OPERATE,
    Actor,
    AsJson,
    DryRun,
    Reason,
    actor_name,
    app,
    checked,
    console,
    customer_list,
    load_settings,
    run_async,
)
from dualwrite.config import Settings
from dualwrite.cutover import (
    GUARD_ACTOR,
    CutoverOps,
    GuardResult,
    OperationResult,
    parse_at,
    parse_percent,
    parse_stage,
    read_cohort_file,
)
from dualwrite.models import Stage, utc_time
from dualwrite.stores import Stores

R = TypeVar("R", bound=BaseModel)

Force = Annotated[bool, typer.Option("--force", help="Allow moves other than one stage forward.")]


@asynccontextmanager
async def cutover_ops(settings: Settings) -> AsyncIterator[CutoverOps]:
    """Cutover operations on their own Redis connection, closed afterwards."""
    async with Stores.open(settings) as stores:
        yield CutoverOps(stores.redis, stores.keys, settings)


def _run(
    ctx: typer.Context,
    action: Callable[[CutoverOps], Awaitable[R]],
    *,
    as_json: bool,
    show: Callable[[R], None],
) -> None:
    """Run one operation on its own Redis connection and print its result (``show``, or JSON);
    dualwrite errors exit 2 with the message."""
    settings = load_settings(ctx)

    async def run() -> R:
        async with cutover_ops(settings) as ops:
            return await action(ops)

    result = run_async(run())
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        show(result)


def print_result(result: OperationResult) -> None:
    """An operation's result for people: Stripe calls, changes, what stayed, notes."""
    verb = "would change" if result.dry_run else "changed"
    for call in result.stripe_calls:
        made = f" -> {call.result_id}" if call.result_id and not result.dry_run else ""
        version = f" (Stripe-Version {call.stripe_version})" if call.stripe_version else ""
        console.print(f"stripe: {escape(call.describe())}{version}{made}", highlight=False)
    for change in result.changes:
        when = f" from {utc_time(change.at)}" if change.at is not None else ""
        console.print(f"{verb}: {escape(change.describe())}{when}", highlight=False)
    for line in result.unchanged:
        console.print(f"unchanged: {escape(line)}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    if result.dry_run:
        console.print("dry run: nothing was changed")
    else:
        console.print(
            f"{len(result.changes)} change(s) by {escape(result.actor)}, audited as: "
            f"{escape(result.reason)}",
            highlight=False,
        )


@app.command("rollout", rich_help_panel=MIGRATE)
def rollout(
    ctx: typer.Context,
    stage: Annotated[
        str, typer.Argument(help="The stage (any case).", metavar="shadow|primary|meter")
    ],
    percent: Annotated[
        str | None, typer.Argument(help="Share of all customers, e.g. 25%", metavar="PERCENT")
    ] = None,
    customers: Annotated[
        list[str] | None,
        typer.Option(
            "--customer",
            "--customers",
            help="Customer ids: repeat the option, or separate them with commas.",
            metavar="CUSTOMER",
        ),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A file with one customer id per line.")
    ] = None,
    force: Force = False,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: AsJson = False,
) -> None:
    """Move a percentage of customers, or named ones, to STAGE (one stage forward at a time).

    A percentage only ever adds customers (lowering it needs --force); named customers are pinned
    by override.
    """
    target = checked(lambda: parse_stage(stage))
    given = [value for value in (percent, customers, file) if value is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of PERCENT, --customers or --file")
    share = checked(lambda: parse_percent(percent)) if percent is not None else None
    cohort = None
    if customers is not None:
        cohort = customer_list(customers)
    elif file is not None:
        cohort = checked(lambda: read_cohort_file(file))
    _run(
        ctx,
        lambda ops: ops.rollout(
            target,
            percent=share,
            customers=cohort,
            actor=actor_name(actor),
            reason=reason,
            force=force,
            dry_run=dry_run,
        ),
        as_json=as_json,
        show=print_result,
    )


@app.command("cutover", rich_help_panel=MIGRATE)
def cutover(
    ctx: typer.Context,
    customer: Annotated[str, typer.Argument(help="The customer, e.g. cus_123")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The stage to move to (one forward; any case).",
            metavar="shadow|primary|meter",
        ),
    ],
    at: Annotated[
        str,
        typer.Option(
            "--at",
            help="period-end (from Stripe), now, or an ISO 8601 time (not in the past).",
            metavar="period-end|now|TIME",
        ),
    ] = "period-end",
    with_schedule: Annotated[
        bool,
        typer.Option(
            "--with-schedule",
            help="With --to primary: also create the Stripe subscription schedule moving the "
            "item to --price at the same instant.",
        ),
    ] = False,
    price: Annotated[
        str | None, typer.Option("--price", help="The meter-backed price (with --with-schedule).")
    ] = None,
    force: Force = False,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: AsJson = False,
) -> None:
    """Move one customer to a stage at its billing period's end (or now, or a given time)."""
    target = checked(lambda: parse_stage(to, what="--to stage"))
    when = checked(lambda: parse_at(at))
    _run(
        ctx,
        lambda ops: ops.cutover(
            customer,
            target,
            at=when,
            actor=actor_name(actor),
            reason=reason,
            force=force,
            with_schedule=with_schedule,
            price=price,
            dry_run=dry_run,
        ),
        as_json=as_json,
        show=print_result,
    )


@app.command("rollback", rich_help_panel=MIGRATE)
def rollback(
    ctx: typer.Context,
    customers: Annotated[
        list[str] | None,
        typer.Argument(help="Customers to roll back, separated by spaces or commas."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="The stage to go back to (default: one stage back).",
            metavar="legacy|shadow|primary",
        ),
    ] = None,
    everyone: Annotated[
        bool, typer.Option("--all", help="Everyone: rollouts, default, overrides, schedules.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Allow moving customers more than one stage back at once (never below primary "
            "for a customer whose item is on its meter-backed price).",
        ),
    ] = False,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: AsJson = False,
) -> None:
    """Send customers (or --all) back one stage, at once: pinned by override, schedules cleared.

    A customer whose item already moved to its meter-backed price stays at primary (Stripe refuses
    its usage records); a pending cutover's Stripe schedule is released first, so the price stays.
    """
    if bool(customers) == everyone:
        raise typer.BadParameter("give customers, or --all")
    target = checked(lambda: parse_stage(to, what="--to stage")) if to is not None else None
    named = customer_list(customers) if customers else []
    who, why = actor_name(actor), reason

    async def action(ops: CutoverOps) -> OperationResult:
        if everyone:
            return await ops.rollback_all(
                to=target or Stage.LEGACY, actor=who, reason=why, force=force, dry_run=dry_run
            )
        return await ops.rollback(
            named, to=target, actor=who, reason=why, force=force, dry_run=dry_run
        )

    _run(ctx, action, as_json=as_json, show=print_result)


@app.command("guard", rich_help_panel=OPERATE)
def guard(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    dry_run: DryRun = False,
    actor: Annotated[
        str | None,
        typer.Option(help="Who runs the pass (default: dualwrite-guard).", metavar="NAME"),
    ] = None,
    reason: Reason = "",
    as_json: AsJson = False,
) -> None:
    """Roll back customers (or the rollout) whose divergence crossed the guardrails.

    Without --once it checks every `[guardrails] interval_seconds` until stopped (`dualwrite
    worker` runs the same check).
    """
    if not once:
        if dry_run:
            raise typer.BadParameter("--dry-run needs --once")
        settings = load_settings(ctx)

        async def loop() -> None:
            async with cutover_ops(settings) as ops:
                await ops.guard().run(actor=actor or GUARD_ACTOR, reason=reason)

        console.print(
            f"guard checking every {settings.guardrails.interval_seconds:g} s (Ctrl-C stops)"
        )
        try:
            run_async(loop())
        except KeyboardInterrupt:
            console.print("guard stopped")
        return
    _run(
        ctx,
        lambda ops: ops.guard_once(dry_run=dry_run, actor=actor or GUARD_ACTOR, reason=reason),
        as_json=as_json,
        show=_print_guard,
    )


def _print_guard(result: GuardResult) -> None:
    console.print(
        ("full pass: " if result.full else "customers changed since the last pass: ")
        + f"checked {result.checked} customer(s) past legacy: {len(result.tripped)} over the "
        f"guardrails ({result.divergent_share_pct:g}%)"
        + (" - the whole rollout goes back" if result.global_tripped else "")
    )
    for trip in result.tripped:
        console.print(
            f"tripped: {trip.customer} {trip.stage.value} -> {trip.rolled_back_to.value}: "
            f"{escape(trip.reason)}",
            highlight=False,
        )
    for action in result.actions:
        if action.changes:
            print_result(action)
    if result.dry_run:
        console.print("dry run: nothing was changed")
