"""Invoices: each subscription's periods closed as its clock passes their end, the running period
previewed (``POST /v1/invoices/create_preview``), and ``GET /v1/invoices[/{id}]``.

A period ``[start, end)`` is invoiced when its subscription's time (its test clock's, else the
stand-in's) reaches ``end``: one line per subscription item, priced by the price the item held at
the period's last moment (``SubscriptionItem.price_before``), so a schedule phase that moves the
item to a meter-backed price at ``end`` leaves this period on the legacy price and bills the next
on the meter. The line's quantity is the period's usage by that price: a legacy metered price's
``aggregate_usage`` over the item's usage records, a meter-backed price's meter formula over the
customer's counted meter events, a licensed price's quantity (UNVERIFIED simplification: Stripe
bills licensed prices in advance; the stand-in bills them with the period they cover). The amount
is ``_pricing``'s. The invoice stays a ``draft`` for an hour (Stripe's default before it finalizes
a subscription invoice), its lines priced whenever it is read so that late meter events count, then
is finalized (``open``: the stand-in takes no payments). Stripe's creation-time invoice is not made.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from stripe_standin._errors import invalid, missing_param, no_such
from stripe_standin._meters import aggregate_exact
from stripe_standin._objects import derived_id, paginate, render_invoice
from stripe_standin._params import (
    Param,
    boolean,
    expand,
    integer,
    lst,
    metadata,
    obj,
    string,
    timestamp as timestamp_param,
)
from stripe_standin._pricing import line_amount
from stripe_standin._state import (
    Call,
    Invoice,
    InvoiceLine,
    Price,
    Store,
    Subscription,
    SubscriptionItem,
)
from stripe_standin._usage import item_total

__all__ = [
    "FINALIZE_AFTER",
    "INVOICE_ENDPOINTS",
    "billed_quantity",
    "create_preview",
    "list_invoices",
    "refresh",
    "retrieve_invoice",
    "settle_invoices",
]

FINALIZE_AFTER = 3600
"""Seconds a period's invoice stays a draft before it is finalized (Stripe: about an hour)."""
MAX_PERIODS = 10_000
"""The most periods one subscription is invoiced for in one go (a clock moved years ahead)."""
_STATUSES = ("draft", "open", "paid", "uncollectible", "void")


def billed_quantity(
    store: Store, sub: Subscription, item: SubscriptionItem, price: Price, start: int, end: int
) -> Decimal:
    """The quantity ``price`` bills for ``item`` over ``[start, end)``."""
    if price.usage_type != "metered":
        return Decimal(item.quantity if item.quantity is not None else 1)
    if price.meter is None:
        return Decimal(item_total(store, item, start, end, price.aggregate_usage or "sum"))
    meter = store.meters[price.meter]
    events = (
        e
        for e in store.events
        if e.meter == meter.id and e.customer == sub.customer and start <= e.timestamp < end
    )
    return aggregate_exact(meter, events)


def _line(
    store: Store,
    sub: Subscription,
    item: SubscriptionItem,
    price: Price,
    span: tuple[int, int],
    invoice_id: str,
) -> InvoiceLine:
    start, end = span
    quantity = billed_quantity(store, sub, item, price, start, end)
    return InvoiceLine(
        id=derived_id("il", invoice_id, item.id),
        subscription_item=item.id,
        price=price.id,
        quantity=int(quantity),
        amount=line_amount(price.pricing, quantity),
        start=start,
        end=end,
    )


def _period_lines(store: Store, sub: Subscription, invoice: Invoice) -> list[InvoiceLine]:
    span = (invoice.period_start, invoice.period_end)
    lines = []
    for item_id in sub.items:
        item = store.items[item_id]
        price = store.prices[item.price_before(invoice.period_end)]
        lines.append(_line(store, sub, item, price, span, invoice.id))
    return lines


def settle_invoices(store: Store, real_now: int) -> None:
    """Invoice every period that has ended and finalize the drafts an hour old, each subscription
    on its own time (call with ``store.lock`` held)."""
    for sub in store.subscriptions.values():
        now = store.time_of(sub, real_now)
        cursor = sub.invoiced_until if sub.invoiced_until is not None else sub.created
        for _ in range(MAX_PERIODS):
            start, end = sub.period(cursor)
            if end > now:
                break
            invoice = Invoice(
                id=derived_id("in", sub.id, start),
                customer=sub.customer,
                subscription=sub.id,
                currency=sub.currency,
                period_start=start,
                period_end=end,
                created=end,
                test_clock=sub.test_clock,
            )
            store.invoices[invoice.id] = invoice
            sub.invoiced_until = cursor = end
    for invoice in store.invoices.values():
        if invoice.finalized_at is not None:
            continue
        owner = store.subscriptions.get(invoice.subscription)
        if owner is not None and store.time_of(owner, real_now) >= invoice.created + FINALIZE_AFTER:
            refresh(store, invoice)
            invoice.finalized_at = invoice.created + FINALIZE_AFTER


def refresh(store: Store, invoice: Invoice) -> Invoice:
    """A draft's lines computed on the usage so far (late meter events count until it is
    finalized); a finalized invoice as it is. Drafts are priced when read, not at every call."""
    owner = store.subscriptions.get(invoice.subscription)
    if invoice.finalized_at is None and owner is not None:
        invoice.lines = _period_lines(store, owner, invoice)
    return invoice


def _get_subscription(store: Store, sub_id: str) -> Subscription:
    sub = store.subscriptions.get(sub_id)
    if sub is None:
        raise no_such("subscription", sub_id, param="subscription")
    return sub


def _swapped(
    store: Store, sub: Subscription, changes: list[dict[str, Any]], proration: str | None
) -> list[tuple[SubscriptionItem, Price]]:
    """The subscription's items with ``subscription_details[items]`` applied: each listed ``id``
    gets its new ``price`` (or leaves, with ``deleted``); an entry without ``id`` adds an item."""
    held = {item_id: store.prices[store.items[item_id].price] for item_id in sub.items}
    added: list[tuple[SubscriptionItem, Price]] = []
    for index, change in enumerate(changes):
        where = f"subscription_details[items][{index}]"
        price = None
        if "price" in change:
            price = store.prices.get(change["price"])
            if price is None:
                raise no_such("price", change["price"], param=f"{where}[price]")
            if (price.interval, price.interval_count, price.currency) != (
                sub.interval,
                sub.interval_count,
                sub.currency,
            ):
                msg = (
                    "Currency and interval fields must match across all plans on this subscription."
                )
                raise invalid(msg, param=f"{where}[price]")
        item_id = change.get("id")
        if item_id is None:
            if price is None:
                raise missing_param(f"{where}[price]")
            new = SubscriptionItem(derived_id("si", sub.id, index), 0, sub.id, price.id, None)
            added.append((new, price))
            continue
        if item_id not in held:
            # UNVERIFIED wording.
            msg = f"The subscription item {item_id} does not belong to subscription {sub.id}."
            raise invalid(msg, param=f"{where}[id]")
        if change.get("deleted"):
            del held[item_id]
            continue
        if price is not None and price.id != held[item_id].id:
            licensed = "licensed" in (price.usage_type, held[item_id].usage_type)
            if licensed and proration != "none":
                msg = (
                    "The stand-in previews a licensed price change only without prorations: "
                    "pass subscription_details[proration_behavior]=none."
                )
                raise invalid(msg, param="subscription_details[proration_behavior]")
            held[item_id] = price
    return [(store.items[item_id], price) for item_id, price in held.items()] + added


def create_preview(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/invoices/create_preview: the running period's invoice of ``subscription``, as it
    stands or with ``subscription_details[items]`` swapped, on the usage so far."""
    p = call.params
    if "subscription" not in p:
        msg = (
            "The stand-in previews a subscription's next invoice: pass subscription (previews "
            "of a customer's pending invoice items are not implemented)."
        )
        raise invalid(msg, param="subscription")
    sub = _get_subscription(store, p["subscription"])
    if p.get("customer") not in (None, sub.customer):
        msg = f"The subscription {sub.id} does not belong to customer {p['customer']}."
        raise invalid(msg, param="customer")
    details: Mapping[str, Any] = p.get("subscription_details") or {}
    items = _swapped(
        store, sub, list(details.get("items") or []), details.get("proration_behavior")
    )
    now = store.time_of(sub, call.now)
    start, end = sub.period(now)
    invoice = Invoice(
        id=derived_id("upcoming_in", sub.id, start, now),
        customer=sub.customer,
        subscription=sub.id,
        currency=sub.currency,
        period_start=start,
        period_end=end,
        created=now,
        test_clock=sub.test_clock,
        billing_reason="upcoming",
    )
    invoice.lines = [
        _line(store, sub, item, price, (start, end), invoice.id) for item, price in items
    ]
    return render_invoice(invoice, store, call.version)


def list_invoices(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/invoices, newest first (filters: customer, subscription, status)."""
    p = call.params
    found = [
        invoice
        for invoice in reversed(store.invoices.values())
        if p.get("customer") in (None, invoice.customer)
        and p.get("subscription") in (None, invoice.subscription)
        and p.get("status") in (None, invoice.status)
    ]
    found.sort(key=lambda invoice: -invoice.created)
    rendered = [render_invoice(refresh(store, invoice), store, call.version) for invoice in found]
    return paginate(rendered, p, call.path, "invoice")


def retrieve_invoice(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/invoices/{id}."""
    invoice = store.invoices.get(call.path_args["id"])
    if invoice is None:
        raise no_such("invoice", call.path_args["id"])
    return render_invoice(refresh(store, invoice), store, call.version)


_PAGE: dict[str, Param] = {
    "limit": integer(minimum=1, maximum=100),
    "starting_after": string(),
    "ending_before": string(),
    "expand": expand(),
}

INVOICE_ENDPOINTS: tuple[tuple[str, str, Mapping[str, Param], Any], ...] = (
    (
        "POST",
        "/v1/invoices/create_preview",
        {
            "customer": string(),
            "subscription": string(),
            "subscription_details": obj(
                {
                    "items": lst(
                        obj(
                            {
                                "id": string(),
                                "price": string(),
                                "deleted": boolean(),
                                "quantity": integer(minimum=0),
                                "metadata": metadata(),
                            }
                        )
                    ),
                    "proration_behavior": string(
                        choices=("always_invoice", "create_prorations", "none")
                    ),
                    "proration_date": timestamp_param(),
                }
            ),
            "expand": expand(),
        },
        create_preview,
    ),
    (
        "GET",
        "/v1/invoices",
        {
            "customer": string(),
            "subscription": string(),
            "status": string(choices=_STATUSES),
            **_PAGE,
        },
        list_invoices,
    ),
    ("GET", "/v1/invoices/{id}", {"expand": expand()}, retrieve_invoice),
)
"""The invoice endpoints, as ``_endpoints._TABLE`` rows (method, path, parameters, handler)."""
