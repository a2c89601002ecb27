"""``dualwrite report``: the divergence report in the terminal or as JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from dualwrite.cli._common import app, console, load_settings, run_async
from dualwrite.flags import StageResolver
from dualwrite.keys import KeySpace
from dualwrite.ledger import Ledger
from dualwrite.models import Stage
from dualwrite.outbox import Outbox
from dualwrite.redis_client import open_redis
from dualwrite.report import build_report, render_table


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
    settings = load_settings(ctx)
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

    run_async(run())
