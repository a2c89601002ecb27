"""``dualwrite reconcile``: Stripe's own totals for a period against the ledger."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dualwrite.cli._common import app, console, err_console, load_settings, run_async
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.reconcile import LegCheck, PeriodChoice, Reconciler, ReconciliationRun
from dualwrite.redis_client import open_redis

#: Exit status: no drift found.
NO_DRIFT = 0
#: Exit status: Stripe holds something else than the ledger on at least one leg.
DRIFT_FOUND = 1
#: Exit status: bad arguments or configuration (also typer's own usage errors).
BAD_ARGUMENTS = 2
#: Exit status: Redis could not be reached.
STORE_UNAVAILABLE = 3


@app.command("reconcile")
def reconcile(
    ctx: typer.Context,
    period: Annotated[
        str,
        typer.Option(
            help="A billing period id (20261101T000000Z/20261201T000000Z), or a date "
            "(2026-11-25: every period holding that UTC day).",
            metavar="PERIOD",
            show_default=False,
        ),
    ],
    customers: Annotated[
        list[str] | None,
        typer.Option(
            "--customer", help="Only this customer (repeat for more).", show_default=False
        ),
    ] = None,
    settle_seconds: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Compare only periods that ended at least this long ago "
            "(default: \\[reconcile] settle_seconds).",
            metavar="SECONDS",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Read Stripe's own totals for a period (legacy usage record summaries, meter event summaries)
    and compare them, per customer and meter event name, with what dualwrite intended and what it
    believes Stripe accepted. Drift is stored for the report.

    Exit status: 0 no drift, 1 drift found, 2 bad arguments or configuration, 3 Redis unreachable.
    """
    try:
        PeriodChoice.parse(period)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--period") from None
    settings = load_settings(ctx)

    async def run() -> ReconciliationRun | None:
        redis = open_redis(settings.redis)
        try:
            reconciler = Reconciler.from_settings(
                settings, redis=redis, settle_seconds=settle_seconds
            )
            try:
                with Progress(
                    TextColumn("reconciling {task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("customers"),
                    TimeElapsedColumn(),
                    console=err_console,
                    transient=True,
                ) as bar:
                    task = bar.add_task(period, total=None)
                    return await reconciler.run(
                        period,
                        customers=customers or None,
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                    )
            finally:
                await reconciler.aclose()
        except StoreUnavailableError as exc:
            err_console.print(
                f"[red]error:[/red] {escape(str(exc))}. Is Redis running? Set DUALWRITE_REDIS__URL "
                "(or REDIS_URL), or \\[redis] url in the config file.",
                highlight=False,
            )
            return None
        finally:
            await redis.aclose()

    result = run_async(run())
    if result is None:
        raise typer.Exit(STORE_UNAVAILABLE)
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        _print(result)
    raise typer.Exit(DRIFT_FOUND if result.drifted else NO_DRIFT)


def _leg(leg: LegCheck) -> str:
    if leg.skipped is not None:
        return f"[dim]{leg.skipped}[/dim]"
    if leg.drifted:
        return f"[red]{leg.accepted_qty} → {leg.stripe_qty} ({leg.drift:+})[/red]"
    return f"[green]{leg.accepted_qty} = {leg.stripe_qty}[/green]"


def _print(result: ReconciliationRun) -> None:
    # A column that would repeat one value on every line goes to the title instead.
    periods = sorted({record.period for record in result.records})
    events = sorted({record.event_name for record in result.records})
    title = f"reconciliation of {periods[0] if len(periods) == 1 else result.period}"
    if len(events) == 1:
        title += f", {events[0]}"
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"{title} (settled {result.settle_seconds} s)",
        caption="legacy, meter: what dualwrite believes Stripe accepted → what Stripe holds",
    )
    table.add_column("customer", no_wrap=True)
    if len(events) > 1:
        table.add_column("event name", no_wrap=True)
    if len(periods) > 1:
        table.add_column("period", overflow="fold")
    table.add_column("intended", justify="right")
    table.add_column("legacy", justify="right", overflow="fold")
    table.add_column("meter", justify="right", overflow="fold")
    for record in result.records:
        cells = [record.customer]
        cells += [record.event_name] if len(events) > 1 else []
        cells += [record.period] if len(periods) > 1 else []
        cells += [str(record.intended_qty), _leg(record.legacy), _leg(record.meter)]
        table.add_row(*cells)
    console.print(table)
    skips = Counter(
        f"{name} {leg.skipped}"
        for record in result.records
        for name, leg in (("legacy", record.legacy), ("meter", record.meter))
        if leg.skipped is not None
    )
    if skips:
        console.print(
            "skipped: " + ", ".join(f"{what} x{count}" for what, count in sorted(skips.items())),
            highlight=False,
        )
    for record in result.records:
        for name, leg in (("legacy", record.legacy), ("meter", record.meter)):
            if leg.skipped == "stripe_error":
                console.print(f"  {record.customer} {name}: {escape(leg.detail)}", highlight=False)
    drifted = result.drifted
    console.print(
        f"{result.customers} customer(s), {len(result.records)} record(s), "
        + (f"[red]{len(drifted)} with drift[/red]" if drifted else "[green]no drift[/green]"),
        highlight=False,
    )
