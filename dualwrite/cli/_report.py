"""``dualwrite report``: the divergence report in the terminal or as JSON."""

from __future__ import annotations

import secrets
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from dualwrite.cli._common import INSPECT, app, console, err_console, load_settings, run_async
from dualwrite.models import Stage, utc_day

if TYPE_CHECKING:
    from dualwrite.config import Settings

#: Exit status: --customer names a customer the report holds nothing for.
UNKNOWN_CUSTOMER = 1


@app.command("report", rich_help_panel=INSPECT)
def report(
    ctx: typer.Context,
    customer: Annotated[str | None, typer.Option(help="Only this customer.")] = None,
    stage: Annotated[
        Stage | None, typer.Option(case_sensitive=False, help="Only customers now at this stage.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="First period (YYYY-MM-DD, UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="Last period (YYYY-MM-DD, UTC).")] = None,
    period: Annotated[
        str | None,
        typer.Option(help="One period: a billing period id, or a day (YYYY-MM-DD) in it."),
    ] = None,
    divergent: Annotated[
        bool, typer.Option("--divergent", help="Only diverged customers.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="Print CSV, one line per customer.")
    ] = False,
    limit: Annotated[
        int, typer.Option(min=1, help="Customers in the table (those needing a look first).")
    ] = 50,
    web: Annotated[
        bool,
        typer.Option(
            "--web",
            help="Serve the report page on this machine (until Ctrl-C) instead of printing.",
        ),
    ] = False,
    port: Annotated[int, typer.Option(min=0, max=65535, help="The page's port (--web).")] = 8765,
) -> None:
    """Per customer: stage, totals on each leg, difference, failures by code, the latest divergent
    events, and whether it is ready for its next stage (the rule is printed with the table)."""
    settings = load_settings(ctx)
    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv")
    if web:
        _serve_page(settings, port=port)
        return
    if period is not None:
        if since is not None or until is not None:
            raise typer.BadParameter("--period replaces --since and --until; give one or the other")
        since, until = _period_days(period)
    for name, value in (("--since", since), ("--until", until)):
        if value is not None:
            try:
                datetime.strptime(value, "%Y-%m-%d")
            except ValueError:
                raise typer.BadParameter(f"{name} {value!r}: write a day as YYYY-MM-DD") from None
    if since is not None and until is not None and since > until:
        msg = f"--since {since} is after --until {until}; give the earlier day first"
        raise typer.BadParameter(msg)

    # Imported here so that `report --help` stays quick (redis, the report's readers).
    from dualwrite.flags import StageResolver  # deferred: start-up cost
    from dualwrite.report import (
        build_report,
        render_table,
        write_csv,
        write_json,
    )  # deferred: start-up cost
    from dualwrite.stores import Stores  # deferred: start-up cost

    async def run() -> None:
        async with Stores.open(settings) as stores:
            resolver = StageResolver(stores.redis, stores.keys, settings.flags)
            result = await build_report(
                stores.ledger,
                resolver,
                outbox=stores.outbox,
                since=since,
                until=until,
                customer=customer,
                stage=stage,
                only_divergent=divergent,
                settings=settings.report,
            )
        if customer is not None and not result.customers:
            err_console.print(
                f"[red]error:[/red] no such customer {customer!r}: dualwrite holds no usage for it"
                + (f" from {since} to {until}" if since or until else "")
                + " (check the id, or `dualwrite flags get` it)",
                highlight=False,
            )
            raise typer.Exit(UNKNOWN_CUSTOMER)
        # Streamed a line at a time: a million customers' JSON is about a gigabyte.
        if as_json:
            write_json(result, sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif as_csv:
            write_csv(result, sys.stdout)
        else:
            console.print(render_table(result, limit=limit))

    run_async(run())


def _period_days(period: str) -> tuple[str, str]:
    """The first and last UTC day of a period id (a day is its own period)."""
    from dualwrite.periods import Period  # deferred: start-up cost

    try:
        span = Period.parse(period)
    except ValueError:
        msg = (
            f"--period {period!r}: write a billing period id (20261101T000000Z/20261201T000000Z) "
            "or a day (2026-11-15)"
        )
        raise typer.BadParameter(msg) from None
    last = max(span.start, span.end - 1)
    return utc_day(span.start), utc_day(last)


def _serve_page(settings: Settings, *, port: int) -> None:
    """The report page on 127.0.0.1 until Ctrl-C, behind DUALWRITE_REPORT_TOKEN or, without one,
    a token made for this run and printed in the address (it opens the page once)."""
    # deferred: start-up cost
    import uvicorn
    from pydantic import SecretStr  # deferred: start-up cost

    from dualwrite.logging import log_config
    from dualwrite.web import report_app

    token = settings.report_token_value() or secrets.token_urlsafe(24)
    served = settings.model_copy(update={"report_token": SecretStr(token)})
    address = f"http://127.0.0.1:{port}/"
    shown = address if settings.report_token_value() else f"{address}?token={token}"
    console.print(
        f"report page on {shown} (prefix {settings.redis.key_prefix!r}; Ctrl-C stops)",
        highlight=False,
        soft_wrap=True,
    )
    config = uvicorn.Config(
        report_app(served),
        host="127.0.0.1",
        port=port,
        lifespan="on",
        access_log=False,
        log_config=log_config(settings.log_format, level="WARNING"),
    )
    uvicorn.Server(config).run()
