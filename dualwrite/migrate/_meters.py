"""``dualwrite meters plan|apply``: a billing meter for every legacy metered price.

The plan reads the account's legacy metered prices (``usage_type=metered``, no ``meter``) and its
meters, and proposes one meter per event name:

* the event name is the one configured for the price (a ``[[meters]]`` table listing its id or
  lookup key), else derived from its lookup key, nickname or product name (lowercase, ``_``);
* ``aggregate_usage`` becomes the meter's formula: ``sum`` → ``sum``, ``last_during_period`` →
  ``last``. ``max`` and ``last_ever`` have no meter twin, and such prices are refused with the reason;
* customers map ``by_id`` from ``payload.stripe_customer_id``, the value is ``payload.value``;
* each legacy price gets the meter-backed price that bills the same (``_prices``): the one mapped
  in ``[[meters]] meter_prices``, an existing one on the meter, or a new one.

Applying creates the meters that do not exist yet (each with an Idempotency-Key derived from its event
name, after looking for an existing meter with that name), then the meter-backed prices, and writes
the mapping into the config file's ``[[meters]]`` tables (``legacy_prices``, ``meter_prices``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from dualwrite.config import MeterMapping
from dualwrite.exceptions import ConfigError
from dualwrite.migrate._config_file import MeterEntry, merge_meters, write_config
from dualwrite.migrate._prices import METER_PLACEHOLDER, PlannedPrice, plan_price
from dualwrite.migrate._stripe import (
    LegacyPrice,
    MeterPrice,
    MigrationStripe,
    MigrationStripeError,
    StripeMeter,
)

__all__ = [
    "FORMULAS",
    "ApplyResult",
    "MeterPlan",
    "PlannedMeter",
    "PlannedPrice",
    "apply_plan",
    "build_plan",
    "describe_call",
]

FORMULAS: dict[str, str] = {"sum": "sum", "last_during_period": "last"}
"""``aggregate_usage`` → the meter formula that bills the same."""

_NO_TWIN = {
    "max": "aggregate_usage=max has no meter twin (meters aggregate sum, count or last)",
    "last_ever": "aggregate_usage=last_ever has no meter twin (a meter's last bills 0 in a "
    "period without events)",
}
_FIX = "keep it on the legacy path, or re-price it with a sum or last_during_period price first"

PlanAction = Literal["create", "exists", "refused"]


class PlannedMeter(BaseModel):
    """One meter of the plan: what it is, the prices it replaces, and what applying does."""

    model_config = ConfigDict(frozen=True)

    event_name: str
    display_name: str
    formula: str | None
    customer_payload_key: str = "stripe_customer_id"
    value_payload_key: str = "value"
    prices: list[str]
    lookup_keys: list[str] = Field(default_factory=list)
    action: PlanAction
    meter_id: str | None = None
    reason: str = ""
    meter_prices: list[PlannedPrice] = Field(default_factory=list)
    """The meter-backed price of each legacy price (none for a refused meter)."""

    @property
    def idempotency_key(self) -> str:
        """The Idempotency-Key of its creation, derived from the event name."""
        digest = hashlib.sha256(self.event_name.encode()).hexdigest()[:40]
        return f"dw-meter-create-{digest}"

    def create_params(self) -> dict[str, Any]:
        """The parameters of ``POST /v1/billing/meters``."""
        return {
            "display_name": self.display_name,
            "event_name": self.event_name,
            "default_aggregation": {"formula": self.formula},
            "customer_mapping": {"type": "by_id", "event_payload_key": self.customer_payload_key},
            "value_settings": {"event_payload_key": self.value_payload_key},
        }


class MeterPlan(BaseModel):
    """Every proposed meter, and the refused prices."""

    model_config = ConfigDict(frozen=True)

    meters: list[PlannedMeter]
    prices_read: int

    @property
    def refused(self) -> list[PlannedMeter]:
        """The entries that cannot become a meter."""
        return [meter for meter in self.meters if meter.action == "refused"]


class ApplyResult(BaseModel):
    """What ``apply`` did (or, dry, would do)."""

    model_config = ConfigDict(frozen=True)

    dry_run: bool
    calls: list[str]
    """The write calls to Stripe, as ``METHOD path`` with their Idempotency-Key and parameters."""
    created: dict[str, str]
    """event name → meter id, for meters created now."""
    existing: dict[str, str]
    prices_created: dict[str, str] = Field(default_factory=dict)
    """legacy price → the meter-backed price created now."""
    prices_existing: dict[str, str] = Field(default_factory=dict)
    """legacy price → the meter-backed price that already bills the same."""
    config_changes: list[str]
    refused: list[PlannedMeter]
    refused_prices: list[PlannedPrice] = Field(default_factory=list)


def slug(text: str) -> str:
    """An event name derived from free text: lowercase letters, digits and ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:100]


def _configured(price: LegacyPrice, configured: tuple[MeterMapping, ...]) -> MeterMapping | None:
    for mapping in configured:
        if (
            price.id in mapping.legacy_prices
            or price.id in mapping.meter_prices
            or (price.lookup_key is not None and price.lookup_key in mapping.lookup_keys)
        ):
            return mapping
    return None


def _billed_by(
    price: LegacyPrice, meters: list[StripeMeter], existing: list[MeterPrice]
) -> StripeMeter | None:
    """The active meter whose meter-backed price already replaces ``price`` (``meters apply``
    names the legacy price it replaces), if any."""
    for twin in existing:
        if twin.active and twin.replaces == price.id:
            for meter in meters:
                if meter.id == twin.price.meter and meter.status == "active":
                    return meter
    return None


def _name_of(price: LegacyPrice, mapping: MeterMapping | None) -> str:
    if mapping is not None:
        return mapping.event_name
    for source in (price.lookup_key, price.nickname, price.product_name):
        if source and slug(source):
            return slug(source)
    return ""


def _group(
    name: str,
    prices: list[LegacyPrice],
    mapping: MeterMapping | None,
    meters: list[StripeMeter],
    existing: list[MeterPrice],
) -> PlannedMeter:
    """The plan entry for the prices sharing one event name."""
    formulas = {FORMULAS[price.aggregate_usage] for price in prices}
    first = prices[0]
    common: dict[str, Any] = {
        "event_name": name,
        "display_name": (first.product_name or first.nickname or name)[:250],
        "prices": [price.id for price in prices],
        "lookup_keys": sorted({price.lookup_key for price in prices if price.lookup_key}),
        "customer_payload_key": mapping.customer_payload_key if mapping else "stripe_customer_id",
        "value_payload_key": mapping.value_payload_key if mapping else "value",
    }
    if len(formulas) > 1:
        reason = (
            f"these prices share the event name {name!r} but aggregate differently "
            f"({', '.join(f'{p.id}: {p.aggregate_usage}' for p in prices)}); map them to "
            "different event names in [[meters]] (legacy_prices)"
        )
        return PlannedMeter(formula=None, action="refused", reason=reason, **common)
    formula = formulas.pop()
    named = [meter for meter in meters if meter.event_name == name]
    active = next((meter for meter in named if meter.status == "active"), None)
    if active is None and named:
        reason = (
            f"meter {named[0].id} with this event name is inactive; reactivate it "
            f"(POST /v1/billing/meters/{named[0].id}/reactivate) or map these prices to another "
            "event name in [[meters]]"
        )
        return PlannedMeter(formula=formula, action="refused", reason=reason, **common)
    mapped = mapping.meter_prices if mapping is not None else {}

    def planned(meter: str | None) -> list[PlannedPrice]:
        return [
            plan_price(price, meter=meter, existing=existing, mapped=mapped.get(price.id))
            for price in prices
        ]

    if active is None:
        return PlannedMeter(formula=formula, action="create", meter_prices=planned(None), **common)
    mismatch = [
        f"{what} {theirs!r} (needs {ours!r})"
        for what, theirs, ours in (
            ("formula", active.formula, formula),
            ("customer key", active.customer_key, common["customer_payload_key"]),
            ("value key", active.value_key, common["value_payload_key"]),
        )
        if theirs != ours
    ]
    if mismatch:
        reason = (
            f"meter {active.id} already uses this event name with {', '.join(mismatch)}; "
            "meters cannot change those: map these prices to another event name in [[meters]]"
        )
        return PlannedMeter(
            formula=formula, action="refused", meter_id=active.id, reason=reason, **common
        )
    return PlannedMeter(
        formula=formula,
        action="exists",
        meter_id=active.id,
        meter_prices=planned(active.id),
        **common,
    )


async def build_plan(stripe: MigrationStripe, configured: tuple[MeterMapping, ...]) -> MeterPlan:
    """Read the legacy metered prices and the meters, and propose the meters to create.

    Raises:
        MigrationStripeError: Stripe refused a read.
    """
    prices = [price async for price in stripe.legacy_prices()]
    meters = await stripe.meters()
    existing = await stripe.meter_prices()
    planned: list[PlannedMeter] = []
    groups: dict[str, list[LegacyPrice]] = {}
    mappings: dict[str, MeterMapping | None] = {}
    for price in prices:
        mapping = _configured(price, configured)
        name = _name_of(price, mapping)
        billed = _billed_by(price, meters, existing)
        if billed is not None and name != billed.event_name:
            if mapping is None:
                name = billed.event_name  # its meter exists: never propose a second one
            else:
                reason = (
                    f"[[meters]] maps it to {name!r}, but meter {billed.id} "
                    f"({billed.event_name!r}) already bills it through a meter-backed price: map "
                    f"it to {billed.event_name!r} instead (a second meter would count it twice)"
                )
                planned.append(
                    PlannedMeter(
                        event_name=name,
                        display_name=price.product_name or price.id,
                        prices=[price.id],
                        formula=None,
                        action="refused",
                        reason=reason,
                    )
                )
                continue
        base: dict[str, Any] = {
            "event_name": name or "?",
            "display_name": price.product_name or price.id,
            "prices": [price.id],
            "formula": None,
            "action": "refused",
        }
        if price.aggregate_usage in _NO_TWIN:
            reason = f"{_NO_TWIN[price.aggregate_usage]}: {_FIX}"
            planned.append(PlannedMeter(reason=reason, **base))
        elif price.aggregate_usage not in FORMULAS:
            reason = f"aggregate_usage={price.aggregate_usage} is unknown to dualwrite: {_FIX}"
            planned.append(PlannedMeter(reason=reason, **base))
        elif not name:
            reason = (
                "no event name can be derived (no lookup key, nickname or product name): "
                "map the price in a [[meters]] table (legacy_prices)"
            )
            planned.append(PlannedMeter(reason=reason, **base))
        else:
            groups.setdefault(name, []).append(price)
            mappings.setdefault(name, mapping)
    for name, members in groups.items():
        planned.append(_group(name, members, mappings[name], meters, existing))
    planned.sort(key=lambda meter: (meter.action == "refused", meter.event_name))
    return MeterPlan(meters=planned, prices_read=len(prices))


def describe_call(meter: PlannedMeter) -> str:
    """The creation call as it is sent: method, path, Idempotency-Key and form parameters."""
    params = meter.create_params()
    flat = [
        f"display_name={params['display_name']}",
        f"event_name={meter.event_name}",
        f"default_aggregation[formula]={meter.formula}",
        "customer_mapping[type]=by_id",
        f"customer_mapping[event_payload_key]={meter.customer_payload_key}",
        f"value_settings[event_payload_key]={meter.value_payload_key}",
    ]
    return f"POST /v1/billing/meters (Idempotency-Key: {meter.idempotency_key}) " + " ".join(flat)


def describe_price_call(meter: PlannedMeter, price: PlannedPrice) -> str:
    """A meter-backed price's creation call as it is sent (the meter's id once it exists)."""
    params = price.create_params(meter.meter_id or METER_PLACEHOLDER)
    flat = " ".join(f"{key}={value}" for key, value in _flatten(params))
    key = price.idempotency_key(meter.event_name)
    return f"POST /v1/prices (Idempotency-Key: {key}) {flat}"


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Form parameters as Stripe's SDKs encode them (``tiers[0][up_to]``)."""
    items: list[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return [(prefix, str(value))]
    found: list[tuple[str, str]] = []
    for key, entry in items:
        found += _flatten(entry, f"{prefix}[{key}]" if prefix else str(key))
    return found


async def _create(stripe: MigrationStripe, meter: PlannedMeter) -> str:
    """Create one meter; one another process created meanwhile is found and reused."""
    try:
        created = await stripe.create_meter(
            meter.create_params(), idempotency_key=meter.idempotency_key
        )
    except MigrationStripeError as exc:
        if exc.failure is None or exc.failure.code != "resource_already_exists":
            raise
        for found in await stripe.meters():
            if found.event_name == meter.event_name and found.status == "active":
                return found.id
        raise
    return created.id


async def apply_plan(
    plan: MeterPlan, stripe: MigrationStripe, *, config_path: Path, dry_run: bool
) -> ApplyResult:
    """Create the planned meters and write the mapping into ``config_path``.

    Dry, nothing is created or written: the result lists the calls and changes it would make.

    Raises:
        MigrationStripeError: Stripe refused a creation (meters created before it stay, and a
            rerun finds them).
        ConfigError: the config file cannot be read, merged or written.
    """
    try:
        text = await anyio.Path(config_path).read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"cannot read the config file {str(config_path)!r}: {exc.strerror}"
        raise ConfigError(msg) from None
    to_create = [meter for meter in plan.meters if meter.action == "create"]
    calls = [describe_call(meter) for meter in to_create]
    created: dict[str, str] = {}
    existing = {m.event_name: m.meter_id or "" for m in plan.meters if m.action == "exists"}
    if not dry_run:
        for meter in to_create:
            created[meter.event_name] = await _create(stripe, meter)
    ids = {**existing, **created}
    prices_created: dict[str, str] = {}
    prices_existing: dict[str, str] = {}
    for meter in plan.meters:
        for price in meter.meter_prices:
            if price.action == "exists" and price.price_id:
                prices_existing[price.legacy_price] = price.price_id
            elif price.action == "create":
                on = meter.model_copy(update={"meter_id": ids.get(meter.event_name)})
                calls.append(describe_price_call(on, price))
                if not dry_run:
                    made = await stripe.create_price(
                        price.create_params(ids[meter.event_name]),
                        idempotency_key=price.idempotency_key(meter.event_name),
                    )
                    prices_created[price.legacy_price] = made.id
    priced = {**prices_existing, **prices_created}
    entries = [
        MeterEntry(
            event_name=meter.event_name,
            legacy_prices=tuple(meter.prices),
            lookup_keys=tuple(meter.lookup_keys),
            meter_id=ids.get(meter.event_name) or "(to be created)",
            customer_payload_key=meter.customer_payload_key,
            value_payload_key=meter.value_payload_key,
            meter_prices=tuple(
                (price.legacy_price, priced.get(price.legacy_price) or "(to be created)")
                for price in meter.meter_prices
                if price.action != "refused"
            ),
        )
        for meter in plan.meters
        if meter.action != "refused"
    ]
    new_text, changes = merge_meters(text, entries)
    if not dry_run and new_text != text:
        await anyio.to_thread.run_sync(write_config, config_path, new_text)
    return ApplyResult(
        dry_run=dry_run,
        calls=calls,
        created=created,
        existing=existing,
        prices_created=prices_created,
        prices_existing=prices_existing,
        config_changes=changes,
        refused=plan.refused,
        refused_prices=[
            price
            for meter in plan.meters
            for price in meter.meter_prices
            if price.action == "refused"
        ],
    )
