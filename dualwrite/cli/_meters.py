"""``dualwrite meters plan|apply``: a billing meter for every legacy metered price."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dualwrite.cli._common import (
    MIGRATE,
    Actor,
    AsJson,
    Reason,
    actor_name,
    app,
    console,
    load_settings,
    run_async,
)
from dualwrite.config import Settings
from dualwrite.exceptions import ConfigError
from dualwrite.migrate import (
    ApplyResult,
    MeterPlan,
    MigrationStripe,
    OpsAudit,
    PlannedPrice,
    apply_plan,
    build_plan,
)
from dualwrite.stores import Stores

meters_app = typer.Typer(
    help="Billing meters for the legacy metered prices: plan what to create, then apply it.",
    no_args_is_help=True,
)
app.add_typer(meters_app, name="meters", rich_help_panel=MIGRATE)


def _api_key(settings: Settings) -> str:
    key = settings.stripe_api_key_value()
    if not key:
        msg = "meters reads the account's prices and meters: set STRIPE_API_KEY"
        raise ConfigError(msg)
    return key


_STYLES = {"create": "green", "exists": "", "refused": "red"}


def _action(action: str) -> str:
    return f"[{_STYLES[action]}]{action}[/]" if _STYLES[action] else action


def _price_cell(price: PlannedPrice) -> str:
    if price.action == "refused":
        return f"{_action('refused')}: {escape(price.reason)}"
    which = price.price_id if price.action == "exists" else "new"
    return f"{_action(price.action)} {which}: {escape(price.terms)}"


def _table(plan: MeterPlan) -> Table:
    table = Table(
        "event name",
        "formula",
        "legacy prices",
        "action",
        "meter",
        "meter-backed price (bills the same)",
        "why",
        title="meters",
    )
    for meter in plan.meters:
        table.add_row(
            escape(meter.event_name),
            meter.formula or "",
            "\n".join(meter.prices),
            _action(meter.action),
            meter.meter_id or "",
            "\n".join(_price_cell(price) for price in meter.meter_prices),
            escape(meter.reason),
        )
    return table


async def _plan(settings: Settings) -> MeterPlan:
    async with MigrationStripe(settings.stripe, api_key=_api_key(settings)) as stripe:
        return await build_plan(stripe, settings.meters)


@meters_app.command("plan")
def plan(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Read the legacy metered prices and propose the meters to create, and for each price the
    meter-backed price that bills the same (same tiers, transform, currency, interval), or the
    existing one (changes nothing).

    aggregate_usage sum becomes formula sum, last_during_period becomes last; max and last_ever
    have no meter twin and are refused with the reason.
    """
    settings = load_settings(ctx)
    found = run_async(_plan(settings))
    if as_json:
        typer.echo(found.model_dump_json(indent=2))
        return
    console.print(_table(found) if found.meters else "no legacy metered prices")
    creates = sum(1 for meter in found.meters if meter.action == "create")
    prices = [price for meter in found.meters for price in meter.meter_prices]
    new_prices = sum(1 for price in prices if price.action == "create")
    refused_prices = sum(1 for price in prices if price.action == "refused")
    console.print(
        f"{found.prices_read} legacy metered price(s): {creates} meter(s) to create, "
        f"{len(found.refused)} refused; {new_prices} meter-backed price(s) to create, "
        f"{refused_prices} refused. `dualwrite meters apply` creates them."
    )


async def _apply(
    settings: Settings, path: Path, *, dry_run: bool, actor: str, reason: str
) -> ApplyResult:
    async with MigrationStripe(settings.stripe, api_key=_api_key(settings)) as stripe:
        found = await build_plan(stripe, settings.meters)
        result = await apply_plan(found, stripe, config_path=path, dry_run=dry_run)
    if dry_run:
        return result
    async with Stores.open(settings) as stores:
        details = {
            "config": path.name,
            "created": result.created,
            "existing": result.existing,
            "prices_created": result.prices_created,
            "prices_existing": result.prices_existing,
            "config_changes": result.config_changes,
            "refused": {",".join(m.prices): m.reason for m in result.refused},
            "reason": reason,
        }
        await OpsAudit(stores.redis, stores.keys).record(
            "meters.apply", actor=actor, details=details
        )
    return result


@meters_app.command("apply")
def apply(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the API calls and config changes; make none.")
    ] = False,
    actor: Actor = None,
    reason: Reason = "",
    as_json: AsJson = False,
) -> None:
    """Create the planned meters (an existing meter with the event name is reused) and their
    meter-backed prices (an existing one billing the same is reused), and write the [[meters]]
    mapping (legacy_prices, meter_prices) into the config file given with --config. Audited."""
    path = ctx.obj
    if path is None:
        raise typer.BadParameter(
            "apply writes the [[meters]] mapping into the config file: give `dualwrite --config "
            "FILE meters apply` (or set DUALWRITE_CONFIG)",
            param_hint="--config",
        )
    settings = load_settings(ctx)
    result = run_async(
        _apply(settings, Path(path), dry_run=dry_run, actor=actor_name(actor), reason=reason)
    )
    if as_json:
        typer.echo(json.dumps(result.model_dump(), indent=2))
        return
    verb = "would call" if dry_run else "called"
    for call in result.calls:
        console.print(f"{verb}: {escape(call)}", highlight=False)
    for event_name, meter_id in result.created.items():
        console.print(f"created meter {meter_id} for {escape(event_name)}")
    for event_name, meter_id in result.existing.items():
        console.print(f"meter {meter_id} already exists for {escape(event_name)}")
    for legacy, created in result.prices_created.items():
        console.print(f"created price {created} (bills like {legacy})")
    for legacy, existing in result.prices_existing.items():
        console.print(f"price {existing} already bills like {legacy}")
    change = "would change" if dry_run else "changed"
    for line in result.config_changes:
        console.print(f"{change} {escape(str(path))}: {escape(line)}", highlight=False)
    if not result.config_changes:
        console.print(f"{escape(str(path))} already maps every planned meter")
    for refused in result.refused:
        console.print(
            f"[red]refused[/red] {', '.join(refused.prices)}: {escape(refused.reason)}",
            highlight=False,
        )
    for planned in result.refused_prices:
        console.print(
            f"[red]refused[/red] a meter-backed price for {planned.legacy_price}: "
            f"{escape(planned.reason)}",
            highlight=False,
        )
