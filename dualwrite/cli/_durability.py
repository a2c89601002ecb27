"""``dualwrite durability``: Redis's durability settings, the data loss its markers recorded, and
clearing that record once ``dualwrite reconcile`` has accounted for it."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from dualwrite.cli._common import (
    INSPECT,
    Actor,
    DryRun,
    Reason,
    actor_name,
    app,
    console,
    load_settings,
    run_async,
)
from dualwrite.models import utc_time

#: Exit status: settings that keep data, and no loss recorded.
DURABLE = 0
#: Exit status: a loss is recorded, or the settings make ``serve`` and ``worker`` refuse to start.
AT_RISK = 1


@app.command("durability", rich_help_panel=INSPECT)
def durability(
    ctx: typer.Context,
    clear_loss: Annotated[
        bool,
        typer.Option(
            "--clear-loss",
            help="Forget the recorded data loss (after `dualwrite reconcile` accounted for it); "
            "kept in the operations audit.",
        ),
    ] = False,
    dry_run: DryRun = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show Redis's persistence and eviction settings (each master of a cluster) as `serve` and
    `worker` check them at start, and the data loss dualwrite's markers recorded, if any.

    Exit status: 0 durable, 1 a loss is recorded or Redis may evict keys, 2 bad configuration,
    or Redis unreachable (1, with a message).
    """
    # deferred: start-up cost
    from dualwrite.durability import clear_loss as clear, read_durability, read_loss
    from dualwrite.migrate import OpsAudit
    from dualwrite.stores import Stores

    settings = load_settings(ctx)

    async def run() -> dict[str, Any]:
        async with Stores.open(settings, max_connections=4) as stores:
            redis, keys = stores.redis, stores.keys
            found = await read_durability(redis)
            loss = await read_loss(redis, keys)
            cleared = None
            if clear_loss and loss is not None and dry_run:
                cleared = loss  # what would be forgotten; nothing is changed or audited
            elif clear_loss and loss is not None:
                cleared = await clear(redis, keys)
                await OpsAudit(redis, keys).record(
                    "durability.clear_loss",
                    actor=actor_name(actor),
                    details={
                        "since": loss.since,
                        "detected_at": loss.detected_at,
                        "reason": reason,
                    },
                )
            return {
                "persistence": found.persistence,
                "settings": found.describe(),
                "evicting": [node.node for node in found.evicting],
                "allow_eviction": settings.redis.allow_eviction,
                "data_lost": loss.as_dict() if loss and (dry_run or not cleared) else None,
                "cleared": cleared.as_dict() if cleared else None,
                "dry_run": dry_run,
            }

    result = run_async(run())
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print(result)
    refused = result["evicting"] and not result["allow_eviction"]
    raise typer.Exit(AT_RISK if result["data_lost"] or refused else DURABLE)


def _print(result: dict[str, Any]) -> None:
    console.print(f"Redis: {result['settings']}", highlight=False)
    if result["evicting"] and not result["allow_eviction"]:
        console.print(
            "[red]serve and worker refuse to start: set maxmemory-policy noeviction[/red] "
            "(or [redis] allow_eviction = true)"
        )
    if result["persistence"] == "none":
        console.print("[red]no persistence: a Redis restart loses everything[/red]")
    cleared = result["cleared"]
    if cleared is not None and result["dry_run"]:
        console.print(
            f"dry run: would clear the data loss recorded since {utc_time(cleared['since'])} "
            "(nothing changed)",
            highlight=False,
        )
    elif cleared is not None:
        console.print(
            f"cleared: the data loss recorded since {utc_time(cleared['since'])} "
            "(the report claims parity again where the ledger shows it)",
            highlight=False,
        )
    lost = result["data_lost"]
    if lost is not None:
        console.print(
            f"[red]Redis lost data: the ledger is incomplete since {utc_time(lost['since'])} "
            f"(seen {utc_time(lost['detected_at'])})[/red]. {lost['action']}",
            highlight=False,
        )
    elif cleared is None:
        console.print("no data loss recorded")
