"""``dualwrite backfill``: replay a customer's legacy usage into meter events."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dualwrite.cli._common import (
    MIGRATE,
    Actor,
    Reason,
    actor_name,
    app,
    console,
    load_settings,
    run_async,
)
from dualwrite.migrate import BackfillResult, run_backfill
from dualwrite.migrate._export import parse_time
from dualwrite.models import utc_time

_CUSTOMER = re.compile(r"^[A-Za-z0-9_\-]{1,255}$")
#: Exit status when Stripe refused at least one event for good.
SOME_FAILED = 1


def _table(result: BackfillResult) -> Table:
    table = Table("source", "event name", "quantity", "timestamp", "status", "note")
    for event in result.events:
        table.add_row(
            escape(event.source),
            escape(event.event_name),
            str(event.quantity),
            utc_time(event.timestamp),
            event.status,
            escape(event.note),
        )
    return table


@app.command("backfill", rich_help_panel=MIGRATE)
def backfill(
    ctx: typer.Context,
    customer: Annotated[
        str, typer.Option(help="The customer entering shadow (cus_…).", show_default=False)
    ],
    since: Annotated[
        str | None,
        typer.Option(
            help="Replay usage from this time on (Unix seconds or ISO 8601); default: the open "
            "billing period (summaries) or every row (export).",
            show_default=False,
        ),
    ] = None,
    from_export: Annotated[
        Path | None,
        typer.Option(
            "--from-export",
            help="A CSV export (customer, subscription_item or event_name, quantity, timestamp, "
            "identifier) instead of Stripe's usage record summaries.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be sent; send and count nothing.")
    ] = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Replay usage already reported to the legacy path as meter events, within Stripe's 35 days.

    Each event's identifier is derived from its summary or export row, and a marker in Redis keeps
    a rerun from counting twice: run it as often as you like. Counted in the ledger as backfilled,
    and audited. Exit status: 0 done, 1 Stripe refused some events, 2 bad input.
    """
    if not _CUSTOMER.fullmatch(customer):
        raise typer.BadParameter(
            f"{customer!r} is not a customer id (like cus_123)", param_hint="--customer"
        )
    start: int | None = None
    if since is not None:
        try:
            start = parse_time(since)
        except ValueError:
            raise typer.BadParameter(
                f"{since!r} is not a time; give Unix seconds or ISO 8601 like 2026-11-01T00:00:00Z",
                param_hint="--since",
            ) from None
    settings = load_settings(ctx)
    with Progress(
        TextColumn("backfilling " + escape(customer)),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=as_json,
    ) as bar:
        task = bar.add_task("events", total=None)
        result = run_async(
            run_backfill(
                settings,
                customer,
                since=start,
                export=from_export,
                dry_run=dry_run,
                actor=actor_name(actor),
                reason=reason,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        )
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        console.print(_table(result) if result.events else "nothing to replay")
        counts = ", ".join(f"{count} {status}" for status, count in result.counts.items() if count)
        what = "would send" if dry_run else "sent"
        quantity = result.quantity("would_send" if dry_run else "sent")
        console.print(
            f"{customer}: {what} {quantity} unit(s) ({counts or 'no events'})"
            + (
                f"; {result.skipped_rows} row(s) of other customers or before --since"
                if result.skipped_rows
                else ""
            )
            + (
                f"; {result.quantity('too_old')} unit(s) too old for a meter"
                if result.count("too_old")
                else ""
            )
        )
    if result.count("failed"):
        raise typer.Exit(SOME_FAILED)
