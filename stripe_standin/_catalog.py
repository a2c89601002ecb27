"""Endpoint handlers for customers, products, prices, subscriptions and subscription items.

Every handler takes the account (``Store``, locked by the caller) and the request's ``Call``, and
returns the JSON body of a 200 reply or raises ``StripeApiError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, cast

from stripe_standin._calendar import Interval
from stripe_standin._errors import StripeApiError, invalid, missing_param, no_such
from stripe_standin._objects import (
    paginate,
    render_customer,
    render_item,
    render_price,
    render_product,
    render_subscription,
)
from stripe_standin._pricing import PriceTier
from stripe_standin._state import (
    Call,
    Customer,
    Price,
    Product,
    Store,
    Subscription,
    SubscriptionItem,
    is_basil_or_later,
)

__all__ = [
    "create_customer",
    "create_price",
    "create_product",
    "create_subscription",
    "list_customers",
    "list_items",
    "list_prices",
    "list_products",
    "list_subscriptions",
    "retrieve_customer",
    "retrieve_item",
    "retrieve_price",
    "retrieve_product",
    "retrieve_subscription",
    "update_item",
]

_DECIMAL_PLACES = 12
_YEAR_IN_DAYS = {"day": 1, "week": 7, "month": 31, "year": 366}


def _metadata(values: dict[str, str] | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Merge metadata as Stripe does: an empty value deletes its key."""
    merged = dict(base or {})
    for key, value in (values or {}).items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _get_customer(store: Store, customer_id: str, param: str = "id") -> Customer:
    customer = store.customers.get(customer_id)
    if customer is None:
        raise no_such("customer", customer_id, param=param)
    return customer


def _get_price(store: Store, price_id: str, param: str = "id") -> Price:
    price = store.prices.get(price_id)
    if price is None:
        raise no_such("price", price_id, param=param)
    return price


def _get_item(store: Store, item_id: str, param: str = "id") -> SubscriptionItem:
    item = store.items.get(item_id)
    if item is None:
        raise no_such("subscription item", item_id, param=param)
    return item


def create_customer(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/customers."""
    p = call.params
    clock = p.get("test_clock")
    if clock is not None and clock not in store.test_clocks:
        raise no_such("test_helpers.test_clock", clock, param="test_clock")
    customer = Customer(
        id=store.new_id("cus"),
        created=store.time_on(clock, call.now),
        test_clock=clock,
        name=p.get("name"),
        email=p.get("email"),
        description=p.get("description"),
        phone=p.get("phone"),
        metadata=_metadata(p.get("metadata")),
    )
    store.customers[customer.id] = customer
    return render_customer(customer)


def retrieve_customer(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/customers/{id}."""
    return render_customer(_get_customer(store, call.path_args["id"]))


def list_customers(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/customers (newest first; optional ``email`` and ``test_clock`` filters)."""
    email, clock = call.params.get("email"), call.params.get("test_clock")
    found = [
        c
        for c in reversed(store.customers.values())
        if email in (None, c.email) and clock in (None, c.test_clock)
    ]
    return paginate([render_customer(c) for c in found], call.params, call.path, "customer")


def create_product(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/products (a custom ``id`` is allowed, as on Stripe)."""
    p = call.params
    product_id = p.get("id") or store.new_id("prod")
    if product_id in store.products:
        raise invalid("Product already exists.", param="id", code="resource_already_exists")
    product = Product(
        id=product_id,
        created=call.now,
        name=p["name"],
        active=p.get("active", True),
        description=p.get("description"),
        metadata=_metadata(p.get("metadata")),
    )
    store.products[product.id] = product
    return render_product(product)


def retrieve_product(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/products/{id}."""
    product = store.products.get(call.path_args["id"])
    if product is None:
        raise no_such("product", call.path_args["id"])
    return render_product(product)


def list_products(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/products (newest first; optional ``active`` filter)."""
    active = call.params.get("active")
    found = [p for p in reversed(store.products.values()) if active is None or p.active == active]
    return paginate([render_product(p) for p in found], call.params, call.path, "product")


def _recurring(store: Store, call: Call, recurring: dict[str, Any]) -> dict[str, Any]:
    """Check a price's ``recurring`` hash against Stripe's rules for legacy and meter prices."""
    interval = recurring["interval"]
    count = recurring.get("interval_count", 1)
    if count * _YEAR_IN_DAYS[interval] > _YEAR_IN_DAYS["year"]:
        msg = "The maximum billing interval is one year (1 year, 12 months, or 52 weeks)."
        raise invalid(msg, param="recurring[interval_count]")
    usage_type = recurring.get("usage_type", "licensed")
    meter_id = recurring.get("meter")
    aggregate = recurring.get("aggregate_usage")
    basil = is_basil_or_later(call.version)
    if aggregate is not None and basil:
        # basil removed the field, so Stripe no longer knows the parameter at all.
        raise StripeApiError(
            400,
            "Received unknown parameter: recurring[aggregate_usage]",
            code="parameter_unknown",
            param="recurring[aggregate_usage]",
        )
    if meter_id is not None:
        if usage_type != "metered":
            msg = "A meter can only be set on a price with `recurring[usage_type]=metered`."
            raise invalid(msg, param="recurring[meter]")
        meter = store.meters.get(meter_id)
        if meter is None:
            raise no_such("billing meter", meter_id, param="recurring[meter]")
        if meter.status != "active":
            raise invalid(
                "You can't attach a deactivated meter to a price.", param="recurring[meter]"
            )
        if aggregate is not None:
            msg = "`recurring[aggregate_usage]` cannot be set on a price backed by a meter."
            raise invalid(msg, param="recurring[aggregate_usage]")
    elif usage_type == "metered":
        if basil:
            # UNVERIFIED wording: Stripe documents that legacy metered prices cannot be created on
            # basil and later; the exact message is not published.
            msg = (
                "Metered prices require a meter as of API version 2025-03-31.basil: pass "
                "`recurring[meter]`, or create the legacy price with a pre-basil Stripe-Version."
            )
            raise invalid(msg, param="recurring[meter]")
        aggregate = aggregate or "sum"
    elif aggregate is not None:
        msg = "`recurring[aggregate_usage]` can only be set when `recurring[usage_type]=metered`."
        raise invalid(msg, param="recurring[aggregate_usage]")
    return {
        "interval": interval,
        "interval_count": count,
        "usage_type": usage_type,
        "aggregate_usage": aggregate,
        "meter": meter_id,
    }


def _exclusive(p: Mapping[str, Any], name: str, where: str) -> None:
    """Refuse ``name`` given both as an integer and as ``name_decimal`` (Stripe's wording), and a
    decimal with more than 12 decimal places; ``where`` is the hash holding them (``tiers[0]``)."""
    whole, exact = (f"{where}[{n}]" if where else n for n in (name, f"{name}_decimal"))
    if name in p and f"{name}_decimal" in p:
        msg = f"You may only specify one of these parameters: {whole}, {exact}."
        raise invalid(msg, code="parameters_exclusive")
    value = p.get(f"{name}_decimal")
    if isinstance(value, Decimal) and -int(value.as_tuple().exponent) > _DECIMAL_PLACES:
        # UNVERIFIED wording; the limit is the API reference's ("at most 12 decimal places").
        msg = f"Invalid {exact}: at most {_DECIMAL_PLACES} decimal places are allowed."
        raise invalid(msg, param=exact)


def _price_tiers(p: Mapping[str, Any]) -> tuple[PriceTier, ...]:
    """Check a tiered price's ``tiers`` and ``tiers_mode`` as Stripe does; the tiers, typed.

    The rules are the API reference's (create a price: ``billing_scheme``, ``tiers``,
    ``tiers_mode``, ``transform_quantity``); the wording is UNVERIFIED where no source is named."""
    if "tiers_mode" not in p:
        raise missing_param("tiers_mode")
    raws: list[dict[str, Any]] = p.get("tiers") or []
    if not raws:
        raise missing_param("tiers")
    if "transform_quantity" in p:
        # Stripe's wording (tierrun/node-sdk#15), param ``tiers``.
        msg = "You may only specify one of these parameters: tiers, transform_quantity."
        raise invalid(msg, param="tiers", code="parameters_exclusive")
    for name in ("unit_amount", "unit_amount_decimal"):
        if name in p:
            msg = (
                f"`{name}` cannot be set when `billing_scheme=tiered`: put the amounts in `tiers`."
            )
            raise invalid(msg, param=name)
    tiers: list[PriceTier] = []
    below = 0
    for index, raw in enumerate(raws):
        where = f"tiers[{index}]"
        last = index == len(raws) - 1
        text = raw["up_to"]
        if text == "inf":
            up_to = None
        elif text.isdigit():
            up_to = int(text)
        else:
            msg = f"Invalid {where}[up_to]: must be a whole number or `inf`, not {text!r}."
            raise invalid(msg, param=f"{where}[up_to]")
        if last and up_to is not None:
            msg = "The last tier of a tiered price must have `up_to` set to `inf`."
            raise invalid(msg, param=f"{where}[up_to]")
        if not last and (up_to is None or up_to <= below):
            msg = (
                f"Invalid {where}[up_to]: tiers must be in increasing order of `up_to` and only "
                "the last may be `inf`."
            )
            raise invalid(msg, param=f"{where}[up_to]")
        for name in ("unit_amount", "flat_amount"):
            _exclusive(raw, name, f"{where}")
        unit = raw.get("unit_amount_decimal", raw.get("unit_amount"))
        flat = raw.get("flat_amount_decimal", raw.get("flat_amount"))
        if unit is None and flat is None:
            # Stripe's wording (lukasaron/terraform-provider-stripe#45); the param is UNVERIFIED.
            raise invalid("An entry in the tiers array is missing an amount.", param="tiers")
        tiers.append(
            PriceTier(
                up_to=up_to,
                unit_amount=None if unit is None else Decimal(unit),
                flat_amount=None if flat is None else Decimal(flat),
            )
        )
        below = up_to or below
    return tuple(tiers)


def create_price(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/prices: licensed, legacy metered (pre-basil) or meter-backed prices; per unit
    (``unit_amount`` or ``unit_amount_decimal``, optionally ``transform_quantity``) or tiered
    (``tiers``, ``tiers_mode``)."""
    p = call.params
    if "product" in p and "product_data" in p:
        raise invalid(
            "You may only specify one of these parameters: product, product_data.",
            code="parameters_exclusive",
        )
    _exclusive(p, "unit_amount", "")
    currency = p["currency"].lower()
    if len(currency) != 3 or not currency.isalpha():
        raise invalid(f"Invalid currency: {p['currency']}", param="currency")
    scheme = p.get("billing_scheme", "per_unit")
    tiers = _price_tiers(p) if scheme == "tiered" else ()
    if scheme == "per_unit":
        for name in ("tiers", "tiers_mode"):
            if name in p:
                # UNVERIFIED wording.
                msg = f"`{name}` can only be set when `billing_scheme=tiered`."
                raise invalid(msg, param=name)
        if "unit_amount" not in p and "unit_amount_decimal" not in p:
            raise missing_param("unit_amount")
    transform = p.get("transform_quantity")
    recurring = _recurring(store, call, p["recurring"]) if "recurring" in p else None
    lookup_key = p.get("lookup_key")
    if lookup_key is not None and any(x.lookup_key == lookup_key for x in store.prices.values()):
        raise invalid("A price already uses that lookup key.", param="lookup_key")
    if "product_data" in p:
        data = p["product_data"]
        product = Product(
            id=store.new_id("prod"),
            created=call.now,
            name=data["name"],
            metadata=_metadata(data.get("metadata")),
        )
        store.products[product.id] = product
        product_id = product.id
    elif "product" in p:
        product_id = p["product"]
        if product_id not in store.products:
            raise no_such("product", product_id, param="product")
    else:
        raise missing_param("product")
    price = Price(
        id=store.new_id("price", 24),
        created=call.now,
        product=product_id,
        currency=currency,
        unit_amount=p.get("unit_amount"),
        unit_amount_decimal=p.get("unit_amount_decimal"),
        lookup_key=lookup_key,
        nickname=p.get("nickname"),
        active=p.get("active", True),
        metadata=_metadata(p.get("metadata")),
        billing_scheme=scheme,
        tiers_mode=p.get("tiers_mode"),
        tiers=tiers,
        transform=None if transform is None else (transform["divide_by"], transform["round"]),
    )
    if recurring is not None:
        price.interval = cast(Interval, recurring["interval"])
        price.interval_count = recurring["interval_count"]
        price.usage_type = recurring["usage_type"]
        price.aggregate_usage = recurring["aggregate_usage"]
        price.meter = recurring["meter"]
    store.prices[price.id] = price
    return render_price(price, call.version, tiers=_expands(call, "tiers"))


def _expands(call: Call, name: str) -> bool:
    """Whether the call asks for ``name`` to be expanded (``expand[]=tiers``)."""
    return name in (call.params.get("expand") or [])


def retrieve_price(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/prices/{id}."""
    price = _get_price(store, call.path_args["id"])
    return render_price(price, call.version, tiers=_expands(call, "tiers"))


def list_prices(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/prices (filters: product, active, lookup_keys, type)."""
    p = call.params
    keys = p.get("lookup_keys")
    found = [
        price
        for price in reversed(store.prices.values())
        if p.get("product") in (None, price.product)
        and p.get("active") in (None, price.active)
        and (keys is None or price.lookup_key in keys)
        and p.get("type") in (None, "recurring" if price.interval else "one_time")
    ]
    tiers = _expands(call, "data.tiers")
    rendered = [render_price(price, call.version, tiers=tiers) for price in found]
    return paginate(rendered, p, call.path, "price")


def _check_item_price(call: Call, price: Price, quantity: int | None, param: str) -> None:
    """Stripe's rules for the price of a subscription item."""
    if price.interval is None:
        msg = (
            "The price specified is set to `type=one_time` but this field only accepts prices "
            "with `type=recurring`."
        )
        raise invalid(msg, param=f"{param}[price]" if param else "price")
    if price.legacy_metered and is_basil_or_later(call.version):
        msg = (
            "Legacy metered prices (metered without a meter) cannot be attached to subscriptions "
            "on API version 2025-03-31.basil or later."
        )
        raise invalid(msg, param=f"{param}[price]" if param else "price")
    if price.usage_type == "metered" and quantity is not None:
        where = f"`{param}`" if param else "the request"
        msg = f"Quantity should not be specified where usage_type is `metered`. Remove quantity from {where}."
        raise invalid(msg, param=f"{param}[quantity]" if param else "quantity")


def create_subscription(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/subscriptions; the period anchor is ``billing_cycle_anchor`` or now."""
    p = call.params
    customer = _get_customer(store, p["customer"], param="customer")
    entries: list[dict[str, Any]] = p["items"]
    if not entries:
        raise missing_param("items")
    prices: list[Price] = []
    for index, entry in enumerate(entries):
        param = f"items[{index}]"
        price = _get_price(store, entry["price"], param=f"{param}[price]")
        _check_item_price(call, price, entry.get("quantity"), param)
        if any(seen.id == price.id for seen in prices):
            msg = f"Cannot add multiple subscription items with the same price: {price.id}"
            raise invalid(msg, param="items")
        if prices and (price.interval, price.interval_count, price.currency) != (
            prices[0].interval,
            prices[0].interval_count,
            prices[0].currency,
        ):
            msg = "Currency and interval fields must match across all plans on this subscription."
            raise invalid(msg, param="items")
        prices.append(price)
    now = store.time_on(customer.test_clock, call.now)  # a customer's clock sets its "now"
    sub = Subscription(
        id=store.new_id("sub", 24),
        created=now,
        customer=customer.id,
        anchor=p.get("billing_cycle_anchor", now),
        test_clock=customer.test_clock,
        interval=cast(Interval, prices[0].interval),
        interval_count=prices[0].interval_count,
        currency=prices[0].currency,
        metadata=_metadata(p.get("metadata")),
    )
    for entry, price in zip(entries, prices, strict=True):
        quantity = None if price.usage_type == "metered" else entry.get("quantity", 1)
        item = SubscriptionItem(
            id=store.new_id("si"),
            created=now,
            subscription=sub.id,
            price=price.id,
            quantity=quantity,
            metadata=_metadata(entry.get("metadata")),
            history=[(now, price.id)],
        )
        store.items[item.id] = item
        sub.items.append(item.id)
    store.subscriptions[sub.id] = sub
    return render_subscription(sub, store, call.now, call.version)


def retrieve_subscription(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/subscriptions/{id}."""
    sub = store.subscriptions.get(call.path_args["id"])
    if sub is None:
        raise no_such("subscription", call.path_args["id"])
    return render_subscription(sub, store, call.now, call.version)


def list_subscriptions(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/subscriptions (filters: customer, price, status, test_clock; every subscription
    is active)."""
    p = call.params
    found = [
        sub
        for sub in reversed(store.subscriptions.values())
        if p.get("customer") in (None, sub.customer)
        and p.get("test_clock") in (None, sub.test_clock)
        and (p.get("price") is None or any(store.items[i].price == p["price"] for i in sub.items))
        and p.get("status", "active") in ("active", "all")
    ]
    rendered = [render_subscription(s, store, call.now, call.version) for s in found]
    return paginate(rendered, p, call.path, "subscription")


def retrieve_item(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/subscription_items/{id}."""
    item = _get_item(store, call.path_args["id"])
    return render_item(item, store, call.now, call.version)


def list_items(store: Store, call: Call) -> dict[str, Any]:
    """GET /v1/subscription_items?subscription=sub_… (the subscription is required)."""
    sub = store.subscriptions.get(call.params["subscription"])
    if sub is None:
        raise no_such("subscription", call.params["subscription"], param="subscription")
    rendered = [render_item(store.items[i], store, call.now, call.version) for i in sub.items]
    return paginate(rendered, call.params, call.path, "subscription item")


def update_item(store: Store, call: Call) -> dict[str, Any]:
    """POST /v1/subscription_items/{id}: change the price (the cutover) or metadata."""
    p = call.params
    item = _get_item(store, call.path_args["id"])
    sub = store.subscriptions[item.subscription]
    current = store.prices[item.price]
    price = _get_price(store, p["price"], param="price") if "price" in p else current
    if price.id != current.id:
        _check_item_price(call, price, p.get("quantity"), "")
        if (price.interval, price.interval_count) != (sub.interval, sub.interval_count):
            msg = "The price's interval must match the other items' interval on this subscription."
            raise invalid(msg, param="price")
        if current.legacy_metered:
            item.legacy_price = current.id
        item.move_to(price.id, store.time_of(sub, call.now))
    elif price.usage_type == "metered" and "quantity" in p:
        msg = "Quantity should not be specified where usage_type is `metered`. Remove quantity."
        raise invalid(msg, param="quantity")
    if price.usage_type == "metered":
        item.quantity = None
    elif "quantity" in p or item.quantity is None:
        item.quantity = p.get("quantity", item.quantity or 1)
    item.metadata = _metadata(p.get("metadata"), item.metadata)
    return render_item(item, store, call.now, call.version)
