"""``dualwrite reconcile``: Stripe's own totals for a period against the ledger."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dualwrite.cli._common import (
    INSPECT,
    app,
    console,
    customer_list,
    err_console,
    load_settings,
    run_async,
)
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.pricing import format_amount
from dualwrite.reconcile import (
    LegCheck,
    MoneyCheck,
    PeriodChoice,
    Reconciler,
    ReconciliationRecord,
    ReconciliationRun,
)
from dualwrite.stores import Stores

#: Exit status: no drift found (and, with --money, no invoice difference).
NO_DRIFT = 0
#: Exit status: Stripe holds something else than the ledger on at least one leg, or (--money) the
#: legs would bill different amounts, or Stripe's preview bills otherwise than computed.
DRIFT_FOUND = 1
#: Exit status: bad arguments or configuration (also typer's own usage errors).
BAD_ARGUMENTS = 2
#: Exit status: Redis could not be reached.
STORE_UNAVAILABLE = 3
#: Exit status: nothing was compared (no usage in the period, every leg skipped, or a --customer
#: dualwrite holds nothing for): "no drift" would claim a parity nobody checked.
NOTHING_COMPARED = 4


@app.command("reconcile", rich_help_panel=INSPECT)
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
            "--customer",
            "--customers",
            help="Only these customers (repeat the option, or separate ids with commas).",
            show_default=False,
            metavar="CUSTOMER",
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
    money: Annotated[
        bool,
        typer.Option(
            "--money",
            help="Also price each leg's total: the legacy price for the legacy leg, the "
            "meter-backed price mapped to it (\\[[meters]] meter_prices) for the meter leg, and "
            "their difference in cents.",
        ),
    ] = False,
    preview: Annotated[
        bool,
        typer.Option(
            "--preview",
            help="With --money (implied): cross-check a running period with Stripe's invoice "
            "preview, as it stands and with the item's price swapped.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Read Stripe's own totals for a period (legacy usage record summaries, meter event summaries)
    and compare them, per customer and meter event name, with what dualwrite intended and what it
    believes Stripe accepted. Drift (and, with --money, what each leg's price bills) is stored for
    the report.

    Exit status: 0 no drift, 1 drift found (or, with --money, an invoice difference above
    \\[report] readiness_max_money_difference), 2 bad arguments or configuration, 3 Redis
    unreachable, 4 nothing compared (no usage in the period, every leg skipped, or an unknown
    --customer).
    """
    try:
        PeriodChoice.parse(period)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--period") from None
    named = customer_list(customers) if customers else None
    settings = load_settings(ctx)

    async def run() -> ReconciliationRun | None:
        stores = Stores.open(settings)
        try:
            reconciler = Reconciler.from_settings(
                settings,
                stores=stores,
                settle_seconds=settle_seconds,
                money=money or preview,
                preview=preview,
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
                        customers=named,
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
            await stores.aclose()

    result = run_async(run())
    if result is None:
        raise typer.Exit(STORE_UNAVAILABLE)
    tolerance = settings.report.readiness_max_money_difference
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        _print(result, tolerance=tolerance)
    differs = result.drifted or result.money_differs(tolerance)
    if differs:
        raise typer.Exit(DRIFT_FOUND)
    if _nothing_compared(result, named):
        raise typer.Exit(NOTHING_COMPARED)
    raise typer.Exit(NO_DRIFT)


def _nothing_compared(result: ReconciliationRun, named: list[str] | None) -> bool:
    """Say (on stderr) what was not compared, and whether that makes the run a non-answer."""
    seen = {record.customer for record in result.records}
    unknown = [customer for customer in named or [] if customer not in seen]
    if unknown:
        err_console.print(
            f"[red]error:[/red] nothing to compare for {', '.join(unknown)} in {result.period}: "
            "dualwrite recorded no usage of this customer there (check the id and --period)",
            highlight=False,
        )
        return True
    compared = [
        record for record in result.records if record.legacy.compared or record.meter.compared
    ]
    if compared:
        return False
    if not result.records:
        why = f"dualwrite recorded no usage in {result.period}"
    else:
        reasons = sorted(
            {
                str(leg.skipped)
                for record in result.records
                for leg in (record.legacy, record.meter)
                if leg.skipped
            }
        )
        why = (
            f"every leg of {len(result.records)} record(s) was skipped ({', '.join(reasons)}; "
            "a period is compared once it ended --settle-seconds ago)"
        )
    err_console.print(
        f"[red]error:[/red] nothing was compared: {why}; this is not a clean bill",
        highlight=False,
    )
    return True


def _leg(leg: LegCheck) -> str:
    if leg.skipped is not None:
        return f"[dim]{leg.skipped}[/dim]"
    if leg.drifted:
        return f"[red]{leg.accepted_qty} → {leg.stripe_qty} ({leg.drift:+})[/red]"
    return f"[green]{leg.accepted_qty} = {leg.stripe_qty}[/green]"


def _money_cells(money: MoneyCheck | None, tolerance: int) -> list[str]:
    if money is None:
        return ["", "", ""]
    if money.skipped is not None or money.currency is None:
        return [f"[dim]{money.skipped or 'not priced'}[/dim]", "", ""]
    legacy = format_amount(money.legacy_amount or 0, money.currency)
    meter = format_amount(money.meter_amount or 0, money.currency)
    difference = format_amount(money.difference or 0, money.currency, signed=True)
    style = "red" if money.differs(tolerance) else "green"
    if money.preview_agrees is not None:
        difference += " (preview agrees)" if money.preview_agrees else " (preview differs)"
        style = style if money.preview_agrees else "red"
    return [legacy, meter, f"[{style}]{difference}[/{style}]"]


def _money_notes(records: list[ReconciliationRecord]) -> None:
    """Why legs were not priced, and what Stripe's preview billed when it disagreed."""
    for record in records:
        money = record.money
        if money is None:
            continue
        if money.skipped in ("stripe_error", "price_error", "no_meter_price", "currency_differs"):
            note = f"{money.skipped}: {money.detail}"
        elif money.preview_agrees is False or money.preview_detail:
            currency = money.currency or ""
            seen = [
                f"{name} {format_amount(amount, currency) if amount is not None else 'none'}"
                for name, amount in (
                    ("legacy", money.preview_legacy_amount),
                    ("meter", money.preview_meter_amount),
                )
            ]
            note = f"Stripe's preview bills {', '.join(seen)}"
            note += f" ({money.preview_detail})" if money.preview_detail else ""
        else:
            continue
        console.print(f"  {record.customer} money: {escape(note)}", highlight=False)


def _print(result: ReconciliationRun, *, tolerance: int = 0) -> None:
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
    priced = any(record.money is not None for record in result.records)
    if priced:
        table.add_column("legacy bills", justify="right")
        table.add_column("meter bills", justify="right")
        table.add_column("invoice difference", justify="right", overflow="fold")
    for record in result.records:
        cells = [record.customer]
        cells += [record.event_name] if len(events) > 1 else []
        cells += [record.period] if len(periods) > 1 else []
        cells += [str(record.intended_qty), _leg(record.legacy), _leg(record.meter)]
        cells += _money_cells(record.money, tolerance) if priced else []
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
    _money_notes(result.records)
    drifted = result.drifted
    compared = any(record.legacy.compared or record.meter.compared for record in result.records)
    verdict = "[green]no drift[/green]" if compared else "[yellow]nothing compared[/yellow]"
    summary = f"{result.customers} customer(s), {len(result.records)} record(s), " + (
        f"[red]{len(drifted)} with drift[/red]" if drifted else verdict
    )
    if priced:
        differing = result.money_differs(tolerance)
        summary += (
            f", [red]{len(differing)} billing differently[/red]"
            if differing
            else ", [green]the same invoices[/green]"
        )
    console.print(summary, highlight=False)
