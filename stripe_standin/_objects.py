"""The wire shape of every object the stand-in returns, in one place, and Stripe's list paging.

Each ``render_*`` function is the single definition of one Stripe object's JSON. ``OBJECT_RENDERERS``
names them by their ``object`` value so that the conformance test can see which objects exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from stripe_standin._clock import format_iso
from stripe_standin._errors import no_such
from stripe_standin._pricing import PriceTier
from stripe_standin._schedules import BILLING_MODE_SINCE, render_schedule
from stripe_standin._state import (
    Customer,
    Invoice,
    InvoiceLine,
    Meter,
    MeterEvent,
    MeterSession,
    Price,
    Product,
    Store,
    Subscription,
    SubscriptionItem,
    TestClock,
    UsageRecord,
    is_basil_or_later,
)

__all__ = [
    "OBJECT_RENDERERS",
    "derived_id",
    "list_object",
    "paginate",
    "render_customer",
    "render_event_summary",
    "render_invoice",
    "render_item",
    "render_meter",
    "render_meter_event",
    "render_meter_event_adjustment",
    "render_meter_event_session",
    "render_price",
    "render_product",
    "render_subscription",
    "render_test_clock",
    "render_thin_event",
    "render_usage_record",
    "render_usage_summary",
    "render_v2_event",
]


def derived_id(prefix: str, *parts: object) -> str:
    """A stable id for an object computed on the fly (summaries, invoices), so paging works."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()
    return f"{prefix}_{digest[:24]}"


def _decimal_text(value: Decimal | None, whole: int | None) -> str | None:
    """``unit_amount_decimal`` as Stripe renders it (also set when only ``unit_amount`` was)."""
    if value is None:
        return None if whole is None else str(whole)
    return format(value.normalize(), "f")


def render_customer(customer: Customer) -> dict[str, Any]:
    """A ``customer`` object."""
    return {
        "id": customer.id,
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": customer.created,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": customer.description,
        "discount": None,
        "email": customer.email,
        "invoice_prefix": customer.id[-8:].upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": dict(customer.metadata),
        "name": customer.name,
        "next_invoice_sequence": 1,
        "phone": customer.phone,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": customer.test_clock,
    }


def render_product(product: Product) -> dict[str, Any]:
    """A ``product`` object."""
    return {
        "id": product.id,
        "object": "product",
        "active": product.active,
        "created": product.created,
        "default_price": None,
        "description": product.description,
        "images": [],
        "livemode": False,
        "marketing_features": [],
        "metadata": dict(product.metadata),
        "name": product.name,
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": None,
        "tax_code": None,
        "type": "service",
        "unit_label": None,
        "updated": product.created,
        "url": None,
    }


def _whole(value: Decimal | None) -> int | None:
    """An amount as Stripe's integer field shows it: set only when it is a whole number."""
    if value is None or value != value.to_integral_value():
        return None
    return int(value)


def _render_tier(tier: PriceTier) -> dict[str, Any]:
    """A ``price_tier`` (``up_to`` null for the last, ``inf`` tier)."""
    return {
        "flat_amount": _whole(tier.flat_amount),
        "flat_amount_decimal": _decimal_text(tier.flat_amount, None),
        "unit_amount": _whole(tier.unit_amount),
        "unit_amount_decimal": _decimal_text(tier.unit_amount, None),
        "up_to": tier.up_to,
    }


def render_price(price: Price, version: str, *, tiers: bool = False) -> dict[str, Any]:
    """A ``price`` object; ``recurring.aggregate_usage`` only exists before basil, and ``tiers``
    only when asked for (``expand[]=tiers``), as on Stripe."""
    recurring: dict[str, Any] | None = None
    if price.interval is not None:
        recurring = {
            "aggregate_usage": price.aggregate_usage,
            "interval": price.interval,
            "interval_count": price.interval_count,
            "meter": price.meter,
            "trial_period_days": None,
            "usage_type": price.usage_type,
        }
        if is_basil_or_later(version):
            del recurring["aggregate_usage"]
    tiered = price.billing_scheme == "tiered"
    rendered: dict[str, Any] = {
        "id": price.id,
        "object": "price",
        "active": price.active,
        "billing_scheme": price.billing_scheme,
        "created": price.created,
        "currency": price.currency,
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": price.lookup_key,
        "metadata": dict(price.metadata),
        "nickname": price.nickname,
        "product": price.product,
        "recurring": recurring,
        "tax_behavior": "unspecified",
        "tiers_mode": price.tiers_mode,
        "transform_quantity": None
        if price.transform is None
        else {"divide_by": price.transform[0], "round": price.transform[1]},
        "type": "one_time" if recurring is None else "recurring",
        "unit_amount": None if tiered else price.unit_amount,
        "unit_amount_decimal": None
        if tiered
        else _decimal_text(price.unit_amount_decimal, price.unit_amount),
    }
    if tiers and tiered:
        rendered["tiers"] = [_render_tier(tier) for tier in price.tiers]
    return rendered


def render_item(item: SubscriptionItem, store: Store, now: int, version: str) -> dict[str, Any]:
    """A ``subscription_item``; metered items carry no ``quantity``, as on Stripe."""
    price = store.prices[item.price]
    sub = store.subscriptions[item.subscription]
    start, end = sub.period(store.time_of(sub, now))
    shown_price = render_price(price, version)
    rendered: dict[str, Any] = {
        "id": item.id,
        "object": "subscription_item",
        "billing_thresholds": None,
        "created": item.created,
        "current_period_end": end,
        "current_period_start": start,
        "discounts": [],
        "metadata": dict(item.metadata),
        "plan": render_plan(shown_price),
        "price": shown_price,
        "subscription": item.subscription,
        "tax_rates": [],
    }
    if price.usage_type != "metered":
        rendered["quantity"] = item.quantity if item.quantity is not None else 1
    return rendered


def render_plan(price: Mapping[str, Any]) -> dict[str, Any]:
    """The legacy ``plan`` Stripe still shows on a subscription item: its recurring price, in a
    plan's words (``amount`` for ``unit_amount``, ``transform_usage`` for ``transform_quantity``)."""
    recurring: Mapping[str, Any] = price["recurring"] or {}
    plan = {
        "id": price["id"],
        "object": "plan",
        "active": price["active"],
        "amount": price["unit_amount"],
        "amount_decimal": price["unit_amount_decimal"],
        "billing_scheme": price["billing_scheme"],
        "created": price["created"],
        "currency": price["currency"],
        "interval": recurring.get("interval"),
        "interval_count": recurring.get("interval_count"),
        "livemode": price["livemode"],
        "metadata": dict(price["metadata"]),
        "meter": recurring.get("meter"),
        "nickname": price["nickname"],
        "product": price["product"],
        "tiers_mode": price["tiers_mode"],
        "transform_usage": price["transform_quantity"],
        "trial_period_days": recurring.get("trial_period_days"),
        "usage_type": recurring.get("usage_type"),
    }
    if "aggregate_usage" in recurring:
        plan["aggregate_usage"] = recurring["aggregate_usage"]
    return plan


def render_subscription(sub: Subscription, store: Store, now: int, version: str) -> dict[str, Any]:
    """A ``subscription`` with its items (periods on the subscription and on each item, on its
    test clock's time if it has one)."""
    start, end = sub.period(store.time_of(sub, now))
    items = [render_item(store.items[item_id], store, now, version) for item_id in sub.items]
    rendered: dict[str, Any] = {
        "id": sub.id,
        "object": "subscription",
        "application": None,
        "automatic_tax": {"enabled": False, "liability": None},
        "billing_cycle_anchor": sub.anchor,
        "billing_thresholds": None,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "collection_method": "charge_automatically",
        "created": sub.created,
        "currency": sub.currency,
        "current_period_end": end,
        "current_period_start": start,
        "customer": sub.customer,
        "days_until_due": None,
        "default_payment_method": None,
        "description": None,
        "discount": None,
        "discounts": [],
        "ended_at": None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": list_object(f"/v1/subscription_items?subscription={sub.id}", items, False),
        "latest_invoice": None,
        "livemode": False,
        "metadata": dict(sub.metadata),
        "pending_update": None,
        "schedule": sub.schedule,
        "start_date": sub.created,
        "status": "active",
        "test_clock": sub.test_clock,
        "trial_end": None,
        "trial_start": None,
    }
    if version[:7] >= BILLING_MODE_SINCE:  # as a schedule's (``_schedules.BILLING_MODE_SINCE``)
        rendered["billing_mode"] = {"flexible": None, "type": "classic", "updated_at": None}
        rendered["billing_schedules"] = []
    return rendered


def _render_line(line: InvoiceLine, invoice: Invoice, store: Store, version: str) -> dict[str, Any]:
    """A ``line_item`` of a subscription invoice: before basil it names its ``price`` and
    ``subscription_item`` itself; from basil on, under ``pricing`` and ``parent``."""
    price = store.prices[line.price]
    product = store.products.get(price.product)
    unit = Decimal(line.amount) / line.quantity if line.quantity else Decimal(0)
    rendered: dict[str, Any] = {
        "id": line.id,
        "object": "line_item",
        "amount": line.amount,
        "currency": invoice.currency,
        "description": f"{line.quantity} x {product.name if product else price.product}",
        "discount_amounts": [],
        "discountable": True,
        "discounts": [],
        "invoice": invoice.id,
        "livemode": False,
        "metadata": {},
        "period": {"end": line.end, "start": line.start},
        "pretax_credit_amounts": [],
        "quantity": line.quantity,
        "subscription": invoice.subscription,
    }
    if not is_basil_or_later(version):
        return rendered | {
            "amount_excluding_tax": line.amount,
            "invoice_item": None,
            "plan": None,
            "price": render_price(price, version),
            "proration": False,
            "proration_details": {"credited_items": None},
            "subscription_item": line.subscription_item,
            "tax_amounts": [],
            "tax_rates": [],
            "type": "subscription",
            "unit_amount_excluding_tax": _decimal_text(unit, None),
        }
    return rendered | {
        "parent": {
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": invoice.subscription,
                "subscription_item": line.subscription_item,
            },
            "type": "subscription_item_details",
        },
        "pricing": {
            "price_details": {"price": price.id, "product": price.product},
            "type": "price_details",
            "unit_amount_decimal": _decimal_text(unit, None),
        },
        "quantity_decimal": str(line.quantity),
        "subtotal": line.amount,
        "taxes": [],
    }


def render_invoice(invoice: Invoice, store: Store, version: str) -> dict[str, Any]:
    """An ``invoice`` of a subscription's period (or a preview), in the caller's version's shape
    (Stripe's fixtures for acacia and dahlia: ``spec/fixtures_billing.json``)."""
    customer = store.customers.get(invoice.customer)
    total = invoice.subtotal
    finalized = invoice.finalized_at
    lines = [_render_line(line, invoice, store, version) for line in invoice.lines]
    rendered: dict[str, Any] = {
        "id": invoice.id,
        "object": "invoice",
        "account_country": "US",
        "account_name": None,
        "account_tax_ids": None,
        "amount_due": total,
        "amount_paid": 0,
        "amount_remaining": total,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": finalized is None,
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": False,
            "liability": None,
            "status": None,
        },
        "automatically_finalizes_at": None if finalized is not None else invoice.created + 3600,
        "billing_reason": invoice.billing_reason,
        "collection_method": "charge_automatically",
        "created": invoice.created,
        "currency": invoice.currency,
        "custom_fields": None,
        "customer": invoice.customer,
        "customer_address": None,
        "customer_email": customer.email if customer else None,
        "customer_name": customer.name if customer else None,
        "customer_phone": customer.phone if customer else None,
        "customer_shipping": None,
        "customer_tax_exempt": "none",
        "customer_tax_ids": [],
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "due_date": None,
        "effective_at": finalized,
        "ending_balance": None if finalized is None else 0,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": list_object(f"/v1/invoices/{invoice.id}/lines", lines, False),
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "number": None if finalized is None else invoice.id[-8:].upper() + "-0001",
        "on_behalf_of": None,
        "payment_settings": {
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": invoice.period_end,
        "period_start": invoice.period_start,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": invoice.status,
        "status_transitions": {
            "finalized_at": finalized,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "test_clock": invoice.test_clock,
        "total": total,
        "total_discount_amounts": [],
        "total_excluding_tax": total,
        "total_pretax_credit_amounts": [],
        "webhooks_delivered_at": invoice.created,
    }
    if not is_basil_or_later(version):
        return rendered | {
            "application_fee_amount": None,
            "charge": None,
            "discount": None,
            "paid": False,
            "paid_out_of_band": False,
            "payment_intent": None,
            "quote": None,
            "subscription": invoice.subscription,
            "subscription_details": {"metadata": None},
            "tax": None,
            "total_tax_amounts": [],
            "transfer_data": None,
        }
    rendered["automatic_tax"]["provider"] = None
    return rendered | {
        "amount_overpaid": 0,
        "customer_account": None,
        "parent": {
            "quote_details": None,
            "subscription_details": {"metadata": None, "subscription": invoice.subscription},
            "type": "subscription_details",
        },
        "subscription": None,  # moved under parent.subscription_details in basil
        "total_taxes": [],
    }


def render_usage_record(record: UsageRecord) -> dict[str, Any]:
    """A legacy ``usage_record``."""
    return {
        "id": record.id,
        "object": "usage_record",
        "livemode": False,
        "quantity": record.quantity,
        "subscription_item": record.subscription_item,
        "timestamp": record.timestamp,
    }


def render_usage_summary(
    item_id: str, start: int, end: int, total: int, *, invoice: str | None = None
) -> dict[str, Any]:
    """A legacy ``usage_record_summary``; closed periods name the invoice that billed them."""
    return {
        "id": derived_id("sis", item_id, start),
        "object": "usage_record_summary",
        "invoice": invoice,
        "livemode": False,
        "period": {"end": end, "start": start},
        "subscription_item": item_id,
        "total_usage": total,
    }


def render_meter(meter: Meter) -> dict[str, Any]:
    """A ``billing.meter``."""
    return {
        "id": meter.id,
        "object": "billing.meter",
        "created": meter.created,
        "customer_mapping": {"event_payload_key": meter.customer_key, "type": "by_id"},
        "default_aggregation": {"formula": meter.formula},
        "display_name": meter.display_name,
        "event_name": meter.event_name,
        "event_time_window": meter.event_time_window,
        "livemode": False,
        "status": meter.status,
        "status_transitions": {"deactivated_at": meter.deactivated_at},
        "updated": meter.updated,
        "value_settings": {"event_payload_key": meter.value_key},
    }


def render_meter_event(event: MeterEvent) -> dict[str, Any]:
    """A ``billing.meter_event`` as the create call returns it."""
    return {
        "object": "billing.meter_event",
        "created": event.created,
        "event_name": event.event_name,
        "identifier": event.identifier,
        "livemode": False,
        "payload": dict(event.payload),
        "timestamp": event.timestamp,
    }


def render_meter_event_adjustment(event_name: str, identifier: str) -> dict[str, Any]:
    """A ``billing.meter_event_adjustment`` (the stand-in applies cancellations at once)."""
    return {
        "object": "billing.meter_event_adjustment",
        "cancel": {"identifier": identifier},
        "event_name": event_name,
        "livemode": False,
        "status": "complete",
        "type": "cancel",
    }


def render_event_summary(
    meter_id: str, customer: str, start: int, end: int, value: float
) -> dict[str, Any]:
    """A ``billing.meter_event_summary`` for one window."""
    return {
        "id": derived_id("mtrusg", meter_id, customer, start, end),
        "object": "billing.meter_event_summary",
        "aggregated_value": value,
        "end_time": end,
        "livemode": False,
        "meter": meter_id,
        "start_time": start,
    }


def render_meter_event_session(session: MeterSession) -> dict[str, Any]:
    """A ``v2.billing.meter_event_session`` (API v2: times are ISO 8601 strings)."""
    return {
        "id": session.id,
        "object": "v2.billing.meter_event_session",
        "authentication_token": session.authentication_token,
        "created": format_iso(session.created),
        "expires_at": format_iso(session.expires_at),
        "livemode": False,
    }


def render_v2_event(
    event_id: str,
    event_type: str,
    created: int,
    data: dict[str, Any],
    meter_id: str | None = None,
) -> dict[str, Any]:
    """A ``v2.core.event`` as ``GET /v2/core/events/{id}`` returns it (docs.stripe.com/api/v2/core/
    events/object); meter error reports relate to their meter, ``no_meter_found`` ones to none."""
    event: dict[str, Any] = {
        "id": event_id,
        "object": "v2.core.event",
        "changes": None,
        "context": None,
        "created": format_iso(created),
        "data": data,
        "livemode": False,
        "reason": None,
        "type": event_type,
    }
    if meter_id is not None:
        event["related_object"] = {
            "id": meter_id,
            "type": "billing.meter",
            "url": f"/v1/billing/meters/{meter_id}",
        }
    return event


def render_test_clock(clock: TestClock) -> dict[str, Any]:
    """A ``test_helpers.test_clock``."""
    details: dict[str, Any] = {}
    if clock.status == "advancing" and clock.target is not None:
        details["advancing"] = {"target_frozen_time": clock.target}
    return {
        "id": clock.id,
        "object": "test_helpers.test_clock",
        "created": clock.created,
        "deletes_after": clock.deletes_after,
        "frozen_time": clock.frozen_time,
        "livemode": False,
        "name": clock.name,
        "status": clock.status,
        "status_details": details,
    }


def render_thin_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """The thin payload an event destination receives: the event without ``data``/``changes``."""
    return {key: value for key, value in event.items() if key not in ("data", "changes")}


OBJECT_RENDERERS: Mapping[str, Callable[..., dict[str, Any]]] = {
    "billing.meter": render_meter,
    "billing.meter_event": render_meter_event,
    "billing.meter_event_adjustment": render_meter_event_adjustment,
    "billing.meter_event_summary": render_event_summary,
    "customer": render_customer,
    "invoice": render_invoice,
    "line_item": _render_line,
    "plan": render_plan,
    "price": render_price,
    "product": render_product,
    "subscription": render_subscription,
    "subscription_item": render_item,
    "subscription_schedule": render_schedule,
    "test_helpers.test_clock": render_test_clock,
    "usage_record": render_usage_record,
    "usage_record_summary": render_usage_summary,
    "v2.billing.meter_event_session": render_meter_event_session,
    "v2.core.event": render_v2_event,
}
"""Every object type the stand-in can return, by its ``object`` value."""


def list_object(url: str, data: Sequence[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """Stripe's list envelope."""
    return {"object": "list", "data": list(data), "has_more": has_more, "url": url}


def paginate(
    objects: Sequence[dict[str, Any]], params: Mapping[str, Any], url: str, kind: str
) -> dict[str, Any]:
    """One page of ``objects`` (already in list order) by ``limit``/``starting_after``/``ending_before``."""
    limit = int(params.get("limit", 10))
    ids = [entry["id"] for entry in objects]
    if "starting_after" in params:
        cursor = params["starting_after"]
        if cursor not in ids:
            raise no_such(kind, cursor, param="starting_after")
        rest = objects[ids.index(cursor) + 1 :]
        return list_object(url, rest[:limit], len(rest) > limit)
    if "ending_before" in params:
        cursor = params["ending_before"]
        if cursor not in ids:
            raise no_such(kind, cursor, param="ending_before")
        before = objects[: ids.index(cursor)]
        return list_object(url, before[-limit:], len(before) > limit)
    return list_object(url, objects[:limit], len(objects) > limit)
