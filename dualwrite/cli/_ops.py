"""``dualwrite worker`` and ``dualwrite dead …``: delivery processes and dead letters."""

from __future__ import annotations

import contextlib
from typing import Annotated, Literal

import typer
from pydantic import TypeAdapter
from rich.table import Table

from dualwrite.cli._common import (
    OPERATE,
    Actor,
    AsJson,
    DryRun,
    Reason,
    actor_name,
    app,
    console,
    err_console,
    load_settings,
    run_async,
)
from dualwrite.deadletters import RETIRED, DeadLetter, DeadLetters
from dualwrite.exceptions import DualwriteError
from dualwrite.migrate import OpsAudit
from dualwrite.models import utc_time
from dualwrite.stores import Stores

dead_app = typer.Typer(
    help="Shadow writes Stripe refused for good, or that expired: list, show, retry, drop.",
    no_args_is_help=True,
)
app.add_typer(dead_app, name="dead", rich_help_panel=OPERATE)

Ids = Annotated[
    list[str] | None, typer.Argument(help="Dead letter ids (see `dead list`).", metavar="ID")
]
All = Annotated[
    bool, typer.Option("--all", help="Every dead letter (or every one shown by filters).")
]
Customer = Annotated[str | None, typer.Option(help="Only this customer's dead letters.")]
Kind = Annotated[
    Literal["refused", "expired", "retired", "unreadable"] | None,
    typer.Option(
        "--kind",
        help="Only dead letters of this kind (retired writes are left out unless named: they "
        "are not failures).",
    ),
]


@app.command("worker", rich_help_panel=OPERATE)
def worker(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Option(help="Consumer name (default: host-pid-random).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus /metrics and the health endpoints (/_dualwrite/live, "
            "/_dualwrite/ready, /_dualwrite/health) on this port.",
        ),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Interface for --metrics-port.")] = "127.0.0.1",
) -> None:
    """Deliver shadow writes from the outbox until stopped (SIGTERM/SIGINT finish the batch in hand).

    Run as many as you like, on any machine: they share Redis and claim what dead workers left.
    """
    # deferred: start-up cost
    from dualwrite.logging import configure_logging
    from dualwrite.metrics import serve_metrics
    from dualwrite.worker import WorkerStatus, run_worker, worker_endpoints

    settings = load_settings(ctx)
    configure_logging(settings.log_format)

    def ready(consumer: str) -> None:
        console.print(
            f"worker {consumer} delivering from {settings.redis.key_prefix} (Ctrl-C stops)"
        )

    status = WorkerStatus()
    with contextlib.ExitStack() as stack:
        if metrics_port is not None:
            endpoints = worker_endpoints(settings, status)
            try:
                port = stack.enter_context(
                    serve_metrics(settings, host=metrics_host, port=metrics_port, app=endpoints)
                )
            except DualwriteError as exc:
                err_console.print(f"[red]error:[/red] {exc}", highlight=False)
                raise typer.Exit(1) from None
            console.print(
                f"metrics on http://{metrics_host}:{port}/metrics, readiness on /_dualwrite/ready",
                highlight=False,
            )
        counts = run_async(run_worker(settings, consumer=name, on_ready=ready, status=status))
    console.print(
        "stopped: "
        + ", ".join(f"{count} {what}" for what, count in counts.items())
        + " (unfinished entries stay pending for another worker)"
    )


def _table(letters: list[DeadLetter]) -> Table:
    table = Table("id", "when", "kind", "customer", "leg", "quantity", "error")
    for letter in letters:
        entry = letter.entry
        table.add_row(
            letter.id,
            utc_time(letter.at) if letter.at else "",
            letter.reason,
            entry.event.customer if entry else "?",
            entry.leg.value if entry else "?",
            str(entry.value) if entry else "?",
            letter.error,
        )
    return table


def _select(ids: list[str] | None, everything: bool) -> list[str] | None:
    """The ids to act on (None: every one the filters select)."""
    if bool(ids) == everything:
        raise typer.BadParameter("give dead letter ids, or --all (with --customer/--kind filters)")
    return ids or None


async def _run_on_letters(
    ctx: typer.Context,
    ids: list[str] | None,
    customer: str | None,
    kind: str | None,
    action: Literal["retry", "drop"],
    *,
    dry_run: bool,
    actor: str,
    reason: str,
) -> list[DeadLetter]:
    settings = load_settings(ctx)
    async with Stores.open(settings) as stores:
        redis, keys = stores.redis, stores.keys
        letters = DeadLetters(redis, keys)
        if ids is None:
            ids = [
                letter.id
                for letter in await letters.find(limit=10**9, customer=customer, reason=kind)
            ]
        if action == "retry":
            done = await letters.retry(ids, dry_run=dry_run)
        else:
            done = await letters.drop(ids, dry_run=dry_run)
        if done and not dry_run:
            details = {"ids": [letter.id for letter in done], "reason": reason}
            await OpsAudit(redis, keys).record(f"dead.{action}", actor=actor, details=details)
        return done


@dead_app.command("list")
def dead_list(
    ctx: typer.Context,
    customer: Customer = None,
    kind: Kind = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    as_json: AsJson = False,
) -> None:
    """The newest dead letters, with Stripe's error."""
    settings = load_settings(ctx)

    async def run() -> tuple[list[DeadLetter], int]:
        async with Stores.open(settings) as stores:
            letters = DeadLetters(stores.redis, stores.keys)
            found = await letters.find(limit=limit, customer=customer, reason=kind)
            hidden = 0 if kind else (await letters.counts(customer=customer)).get(RETIRED, 0)
            return found, hidden

    found, retired = run_async(run())
    if as_json:
        typer.echo(TypeAdapter(list[DeadLetter]).dump_json(found, indent=2).decode())
        return
    console.print(_table(found) if found else "no dead letters")
    if retired:
        console.print(
            f"{retired} retired legacy write(s) not shown: not failures, Stripe refused them "
            "because the item moved to its meter-backed price (--kind retired lists them)",
            highlight=False,
        )


@dead_app.command("show")
def dead_show(
    ctx: typer.Context,
    dead_id: Annotated[str, typer.Argument(help="A dead letter id.", metavar="ID")],
) -> None:
    """One dead letter in full: the event, both legs' details, the error."""
    settings = load_settings(ctx)

    async def run() -> DeadLetter:
        async with Stores.open(settings) as stores:
            return await DeadLetters(stores.redis, stores.keys).show(dead_id)

    letter = run_async(run())
    console.print_json(letter.model_dump_json(exclude={"raw"} if letter.entry else set()))


@dead_app.command("retry")
def dead_retry(
    ctx: typer.Context,
    ids: Ids = None,
    everything: All = False,
    customer: Customer = None,
    kind: Kind = None,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Put dead letters back in the outbox (their failure leaves the ledger until they fail again).
    Audited."""
    _act(ctx, ids, everything, customer, kind, "retry", dry_run, actor_name(actor), reason)


@dead_app.command("drop")
def dead_drop(
    ctx: typer.Context,
    ids: Ids = None,
    everything: All = False,
    customer: Customer = None,
    kind: Kind = None,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Delete dead letters for good (the ledger keeps counting them as failed). Audited."""
    _act(ctx, ids, everything, customer, kind, "drop", dry_run, actor_name(actor), reason)


def _act(
    ctx: typer.Context,
    ids: list[str] | None,
    everything: bool,
    customer: str | None,
    kind: str | None,
    action: Literal["retry", "drop"],
    dry_run: bool,
    actor: str,
    reason: str,
) -> None:
    """Retry or drop the chosen dead letters, and say what was (or would be) done."""
    done = run_async(
        _run_on_letters(
            ctx,
            _select(ids, everything),
            customer,
            kind,
            action,
            dry_run=dry_run,
            actor=actor,
            reason=reason,
        )
    )
    past = {"retry": "retried", "drop": "dropped"}[action]
    console.print(_table(done) if done else f"nothing to {action}")
    console.print(f"{f'would {action}' if dry_run else past} {len(done)} dead letter(s)")
