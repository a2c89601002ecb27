"""The stand-in prices and invoices: tiered, transformed and decimal prices, the hand-worked table
(shared with dualwrite's price math, through ``tests/pricing/pricing_cases.json``) billed by the stand-in's
own math, its period-end invoices, ``GET /v1/invoices`` and invoice previews of a price swap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from stripe_standin import StripeStandin
from stripe_standin._openapi import SPEC_DIR
from stripe_standin.checking import SpecChecker
from tests.standin.standin_support import ACACIA, BASIL, MONTH_LATER, START

pytestmark = pytest.mark.anyio

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "pricing" / "pricing_cases.json").read_text()
)["cases"]
DAY = 86_400
HOUR = 3_600


def price_form(price: dict[str, Any], product: str, **recurring: str) -> dict[str, Any]:
    """``POST /v1/prices`` parameters billing like the table's price object: whole amounts as
    integers, others as ``*_decimal`` strings."""
    form: dict[str, Any] = {"currency": price["currency"], "product": product}
    form |= {f"recurring[{key}]": value for key, value in recurring.items()}
    form["recurring[interval]"] = "month"
    form["recurring[usage_type]"] = "metered"
    if price["billing_scheme"] == "tiered":
        form |= {"billing_scheme": "tiered", "tiers_mode": price["tiers_mode"]}
        for index, tier in enumerate(price["tiers"]):
            form[f"tiers[{index}][up_to]"] = "inf" if tier["up_to"] is None else tier["up_to"]
            for name in ("unit_amount", "flat_amount"):
                if tier.get(name) is not None:
                    form[f"tiers[{index}][{name}]"] = tier[name]
                elif tier.get(f"{name}_decimal") is not None:
                    form[f"tiers[{index}][{name}_decimal]"] = tier[f"{name}_decimal"]
        return form
    if price["unit_amount"] is not None:
        form["unit_amount"] = price["unit_amount"]
    else:
        form["unit_amount_decimal"] = price["unit_amount_decimal"]
    transform = price.get("transform_quantity")
    if transform:
        form["transform_quantity[divide_by]"] = transform["divide_by"]
        form["transform_quantity[round]"] = transform["round"]
    return form


async def post(http: httpx.AsyncClient, path: str, form: dict[str, Any], **headers: str) -> Any:
    """A form POST that must succeed; its JSON."""
    reply = await http.post(path, data=form, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()


async def refused(http: httpx.AsyncClient, path: str, form: dict[str, Any]) -> dict[str, Any]:
    """A form POST that must be refused with a 400; its error."""
    reply = await http.post(path, data=form)
    assert reply.status_code == 400, reply.text
    error: dict[str, Any] = reply.json()["error"]
    return error


@pytest.fixture
async def product(http: httpx.AsyncClient) -> str:
    """A product for the prices."""
    return str((await post(http, "/v1/products", {"name": "Fonts"}))["id"])


async def subscribe(http: httpx.AsyncClient, price: str, anchor: int = START) -> tuple[str, str]:
    """A new customer on ``price``, periods anchored at ``anchor``: (subscription, item)."""
    customer = await post(http, "/v1/customers", {"name": "Ada"})
    sub = await post(
        http,
        "/v1/subscriptions",
        {"customer": customer["id"], "items[0][price]": price, "billing_cycle_anchor": anchor},
    )
    return sub["id"], sub["items"]["data"][0]["id"]


async def meter(http: httpx.AsyncClient, formula: str = "sum") -> dict[str, Any]:
    """A meter on ``calls``."""
    form = {
        "display_name": "Calls",
        "event_name": "calls",
        "default_aggregation[formula]": formula,
    }
    return dict(await post(http, "/v1/billing/meters", form))


class TestTheTable:
    """The hand-worked table, billed by the stand-in's own price math over HTTP."""

    @pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
    async def test_preview_bills_the_case(
        self, http: httpx.AsyncClient, product: str, case: dict[str, Any]
    ) -> None:
        """A legacy price made from the case's price object, the case's quantity reported as
        usage: the invoice preview's line bills the case's cents (see ``case["page"]``)."""
        price = await post(http, "/v1/prices", price_form(case["price"], product))
        sub, item = await subscribe(http, price["id"], anchor=START - DAY)
        if case["quantity"]:
            await post(
                http, f"/v1/subscription_items/{item}/usage_records", {"quantity": case["quantity"]}
            )
        preview = await post(http, "/v1/invoices/create_preview", {"subscription": sub})
        [line] = preview["lines"]["data"]
        assert (line["amount"], line["quantity"]) == (case["cents"], case["quantity"]), case["page"]
        assert preview["subtotal"] == preview["total"] == case["cents"]


class TestPrices:
    """Tiered, transformed and decimal prices: accepted as Stripe accepts them, refused clearly."""

    async def test_tiers_are_shown_when_expanded(
        self, http: httpx.AsyncClient, product: str
    ) -> None:
        """A tiered price has no unit amount; its tiers appear with ``expand[]=tiers`` only, the
        last one ``up_to`` null, decimal amounts as strings."""
        form = price_form(CASES[-1]["price"], product, aggregate_usage="max")
        created = await post(http, "/v1/prices", form)
        assert created["billing_scheme"] == "tiered" and "tiers" not in created
        assert created["unit_amount"] is None and created["unit_amount_decimal"] is None
        price = (await http.get(f"/v1/prices/{created['id']}", params={"expand[]": "tiers"})).json()
        assert price["tiers_mode"] == "volume" and price["recurring"]["aggregate_usage"] == "max"
        assert price["tiers"] == [
            {
                "flat_amount": None,
                "flat_amount_decimal": "0.25",
                "unit_amount": None,
                "unit_amount_decimal": "0.75",
                "up_to": None,
            }
        ]

    async def test_transform_is_shown(self, http: httpx.AsyncClient, product: str) -> None:
        """``transform_quantity`` comes back as given."""
        form: dict[str, Any] = {"currency": "usd", "product": product, "unit_amount": 1000}
        form |= {"transform_quantity[divide_by]": 60, "transform_quantity[round]": "up"}
        created = await post(http, "/v1/prices", form)
        assert created["transform_quantity"] == {"divide_by": 60, "round": "up"}

    @pytest.mark.parametrize(
        ("change", "param", "words"),
        [
            ({"tiers_mode": None}, "tiers_mode", "Missing required param"),
            ({"tiers[1][up_to]": 20}, "tiers[1][up_to]", "`inf`"),
            ({"tiers[0][up_to]": "inf"}, "tiers[0][up_to]", "increasing order"),
            ({"tiers[0][up_to]": "five"}, "tiers[0][up_to]", "whole number or `inf`"),
            ({"unit_amount": 5}, "unit_amount", "billing_scheme=tiered"),
            (
                {"transform_quantity[divide_by]": 2, "transform_quantity[round]": "up"},
                "tiers",
                "one of these parameters: tiers, transform_quantity",
            ),
            ({"tiers[0][unit_amount]": None}, "tiers", "tiers array is missing an amount"),
            ({"tiers[0][unit_amount_decimal]": "1.5"}, None, "only specify one"),
            (
                {"tiers[0][unit_amount]": None, "tiers[0][unit_amount_decimal]": "0.1234567890123"},
                "tiers[0][unit_amount_decimal]",
                "12 decimal places",
            ),
            ({"billing_scheme": "per_unit", "unit_amount": 1}, "tiers", "billing_scheme=tiered"),
        ],
    )
    async def test_bad_tiers_are_refused(
        self,
        http: httpx.AsyncClient,
        product: str,
        change: dict[str, Any],
        param: str | None,
        words: str,
        stripe_spec: SpecChecker,
    ) -> None:
        """Each broken rule of tiered prices is a 400 naming the parameter and the fix."""
        form: dict[str, Any] = {
            "billing_scheme": "tiered",
            "tiers_mode": "graduated",
            "currency": "usd",
        }
        form |= {"product": product, "recurring[interval]": "month"}
        form |= {"tiers[0][up_to]": 5, "tiers[0][unit_amount]": 7, "tiers[1][up_to]": "inf"}
        form["tiers[1][unit_amount]"] = 6
        form |= change
        sent = {k: v for k, v in form.items() if v is not None}
        if param == "tiers[0][up_to]" and change[param] == "five":
            # Stripe's own spec refuses the type too: the stand-in must answer it all the same.
            with stripe_spec.expect_invalid_requests():
                error = await refused(http, "/v1/prices", sent)
        else:
            error = await refused(http, "/v1/prices", sent)
        assert error.get("param") == param and words in error["message"], error

    async def test_divide_by_must_be_positive(self, http: httpx.AsyncClient, product: str) -> None:
        """``transform_quantity[divide_by]=0`` is refused as Stripe refuses integers out of range."""
        form: dict[str, Any] = {"currency": "usd", "product": product, "unit_amount": 5}
        form |= {"transform_quantity[divide_by]": 0, "transform_quantity[round]": "up"}
        error = await refused(http, "/v1/prices", form)
        assert error["param"] == "transform_quantity[divide_by]"


MARCH = 1_742_040_000
"""The end of the second period of a subscription anchored at ``START`` (2025-03-15 12:00 UTC)."""
FONTS: list[dict[str, Any]] = [{"up_to": 5, "unit_amount": 700}, {"up_to": 10, "unit_amount": 650}]
FONTS.append({"up_to": None, "unit_amount": 600})


def graduated_fonts(product: str) -> dict[str, Any]:
    """The graduated fonts of Stripe's tiered-pricing page as a legacy ``sum`` price."""
    tiers = [
        {"up_to": t["up_to"], "unit_amount": t["unit_amount"], "flat_amount": None} for t in FONTS
    ]
    price = {"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated"}
    return price_form(price | {"tiers": tiers}, product, aggregate_usage="sum")


async def meter_price(http: httpx.AsyncClient, product: str, meter_id: str) -> str:
    """A meter-backed price billing the graduated fonts."""
    form = graduated_fonts(product)
    del form["recurring[aggregate_usage]"]
    form["recurring[meter]"] = meter_id
    return str((await post(http, "/v1/prices", form, **{"Stripe-Version": BASIL}))["id"])


async def invoices(http: httpx.AsyncClient, version: str = ACACIA, **filters: Any) -> Any:
    """``GET /v1/invoices`` with ``filters``; its JSON."""
    reply = await http.get("/v1/invoices", params=filters, headers={"Stripe-Version": version})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def meter_event(http: httpx.AsyncClient, customer: str, value: int, ts: int) -> None:
    """A meter event on ``calls``."""
    form = {"event_name": "calls", "payload[stripe_customer_id]": customer}
    await post(http, "/v1/billing/meter_events", form | {"payload[value]": value, "timestamp": ts})


class TestInvoices:
    """Finalized invoices at each period end, the list of them, and previews of a price swap."""

    async def test_period_end_invoice(
        self, http: httpx.AsyncClient, product: str, standin: StripeStandin
    ) -> None:
        """6 fonts used in the period: at its end a draft bills 41.50 USD (graduated); an hour
        later it is finalized (open), and the period's usage summary names it."""
        price = await post(http, "/v1/prices", graduated_fonts(product))
        sub, item = await subscribe(http, price["id"])
        await post(http, f"/v1/subscription_items/{item}/usage_records", {"quantity": 6})
        assert (await invoices(http))["data"] == []
        standin.clock.set(MONTH_LATER)
        [draft] = (await invoices(http, subscription=sub))["data"]
        assert (draft["status"], draft["amount_due"], draft["billing_reason"]) == (
            "draft",
            4150,
            "subscription_cycle",
        )
        standin.clock.set(MONTH_LATER + HOUR)
        [final] = (await invoices(http, status="open"))["data"]
        assert final["id"] == draft["id"] and final["status_transitions"]["finalized_at"]
        assert [i["id"] for i in standin.invoices(customer=final["customer"])] == [final["id"]]
        [line] = final["lines"]["data"]
        assert (line["amount"], line["quantity"], line["subscription_item"]) == (4150, 6, item)
        assert line["period"] == {"start": START, "end": MONTH_LATER}
        assert line["price"]["id"] == price["id"]
        summaries = await http.get(f"/v1/subscription_items/{item}/usage_record_summaries")
        assert summaries.json()["data"][1]["invoice"] == final["id"]
        [basil] = (await invoices(http, BASIL, customer=final["customer"]))["data"]
        [line] = basil["lines"]["data"]
        assert line["parent"]["subscription_item_details"]["subscription_item"] == item
        assert line["pricing"]["price_details"]["price"] == price["id"]
        assert basil["parent"]["subscription_details"]["subscription"] == sub

    async def test_cutover_at_the_period_end(
        self, http: httpx.AsyncClient, product: str, standin: StripeStandin
    ) -> None:
        """A schedule moves the item to a meter-backed price at the period's end: that period is
        invoiced on the legacy price (its usage records), the next on the meter (its events)."""
        price = await post(http, "/v1/prices", graduated_fonts(product))
        found = await meter(http)
        metered = await meter_price(http, product, found["id"])
        sub, item = await subscribe(http, price["id"])
        schedule = await post(http, "/v1/subscription_schedules", {"from_subscription": sub})
        phases = {"phases[0][items][0][price]": price["id"], "end_behavior": "release"}
        phases["phases[1][items][0][price]"] = metered
        await post(http, f"/v1/subscription_schedules/{schedule['id']}", phases)
        await post(http, f"/v1/subscription_items/{item}/usage_records", {"quantity": 11})
        customer = schedule["customer"]
        standin.clock.set(MONTH_LATER + 10)
        refused_record = await http.post(
            f"/v1/subscription_items/{item}/usage_records", data={"quantity": 1}
        )
        assert "not on the legacy metered billing system" in refused_record.text
        for value in (2, 3):
            await meter_event(http, customer, value, MONTH_LATER + value)
        await meter_event(http, customer, 100, MONTH_LATER - 5)  # in the legacy period: unbilled
        standin.clock.set(MARCH + HOUR)
        newest, oldest = (await invoices(http, customer=customer))["data"]
        assert [line["price"]["id"] for line in oldest["lines"]["data"]] == [price["id"]]
        assert (oldest["total"], oldest["lines"]["data"][0]["quantity"]) == (7350, 11)
        [line] = newest["lines"]["data"]
        assert (line["price"]["id"], line["quantity"], line["amount"]) == (metered, 5, 3500)
        assert line["period"] == {"start": MONTH_LATER, "end": MARCH}

    async def test_list_filters_and_pages(
        self, http: httpx.AsyncClient, product: str, standin: StripeStandin
    ) -> None:
        """Newest first; filtered by customer, subscription and status; paged by ``limit`` and
        ``starting_after``."""
        price = await post(http, "/v1/prices", graduated_fonts(product))
        first, _ = await subscribe(http, price["id"])
        second, _ = await subscribe(http, price["id"])
        standin.clock.set(MARCH + 60)
        everything = (await invoices(http))["data"]
        assert len(everything) == 4 and everything[0]["created"] == MARCH
        assert [i["status"] for i in everything] == ["draft", "draft", "open", "open"]
        assert len((await invoices(http, subscription=first))["data"]) == 2
        assert len((await invoices(http, status="draft"))["data"]) == 2
        page = await invoices(http, limit=3)
        assert page["has_more"] and len(page["data"]) == 3
        rest = await invoices(http, limit=3, starting_after=page["data"][-1]["id"])
        assert [i["id"] for i in rest["data"]] == [everything[-1]["id"]] and not rest["has_more"]
        assert {i["subscription"] for i in everything} == {first, second}
        missing = await http.get("/v1/invoices/in_nothing")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "id"

    async def test_preview_of_a_price_swap(
        self, http: httpx.AsyncClient, product: str, standin: StripeStandin
    ) -> None:
        """The running period previewed with the item on the meter-backed price bills the
        customer's meter events there; deleting the item leaves no line."""
        price = await post(http, "/v1/prices", graduated_fonts(product))
        metered = await meter_price(http, product, (await meter(http))["id"])
        sub, item = await subscribe(http, price["id"])
        await post(http, f"/v1/subscription_items/{item}/usage_records", {"quantity": 6})
        customer = (await http.get(f"/v1/subscriptions/{sub}")).json()["customer"]
        await meter_event(http, customer, 12, START + 5)
        swap = {"subscription": sub, "subscription_details[items][0][id]": item}
        swap["subscription_details[items][0][price]"] = metered
        swap["subscription_details[proration_behavior]"] = "none"
        [line] = (await post(http, "/v1/invoices/create_preview", swap))["lines"]["data"]
        assert (line["price"]["id"], line["quantity"], line["amount"]) == (metered, 12, 7950)
        [line] = (await post(http, "/v1/invoices/create_preview", {"subscription": sub}))["lines"][
            "data"
        ]
        assert (line["price"]["id"], line["amount"]) == (price["id"], 4150)
        gone = {"subscription": sub, "subscription_details[items][0][id]": item}
        gone["subscription_details[items][0][deleted]"] = "true"
        assert (await post(http, "/v1/invoices/create_preview", gone))["lines"]["data"] == []

    @pytest.mark.parametrize(
        ("change", "status", "param"),
        [
            ({"subscription_details[items][0][id]": "si_other"}, 400, "[items][0][id]"),
            ({"subscription_details[items][0][price]": "price_none"}, 404, "[items][0][price]"),
            ({"subscription": None}, 400, "subscription"),
            ({"subscription": "sub_none"}, 404, "subscription"),
        ],
    )
    async def test_bad_previews_are_refused(
        self,
        http: httpx.AsyncClient,
        product: str,
        change: dict[str, Any],
        status: int,
        param: str,
    ) -> None:
        """An item not on the subscription, an unknown price or subscription: refused, naming
        the parameter."""
        price = await post(http, "/v1/prices", graduated_fonts(product))
        sub, item = await subscribe(http, price["id"])
        form: dict[str, Any] = {"subscription": sub, "subscription_details[items][0][id]": item}
        form |= change
        reply = await http.post(
            "/v1/invoices/create_preview", data={k: v for k, v in form.items() if v is not None}
        )
        assert reply.status_code == status, reply.text
        assert reply.json()["error"]["param"].endswith(param)

    @pytest.mark.parametrize(
        ("era", "version"), [("2025-02 (acacia era)", ACACIA), ("2026-07-29.dahlia", BASIL)]
    )
    async def test_fixture_fields_are_present(
        self,
        http: httpx.AsyncClient,
        product: str,
        standin: StripeStandin,
        era: str,
        version: str,
    ) -> None:
        """Every field of Stripe's own example invoice and line item (``fixtures_billing.json``,
        per era) is in ours, with the same JSON type where both are set."""
        fixtures = json.loads((SPEC_DIR / "fixtures_billing.json").read_text())["resources"][era]
        price = await post(http, "/v1/prices", graduated_fonts(product))
        await subscribe(http, price["id"])
        standin.clock.set(MONTH_LATER + HOUR)
        [invoice] = (await invoices(http, version))["data"]
        ours = {"invoice": invoice, "line_item": invoice["lines"]["data"][0]}
        found = [
            f"{name}.{field}"
            for name in ours
            for field, value in fixtures[name].items()
            if field not in ours[name]
            or (
                None not in (value, ours[name][field])
                and type(value) is not type(ours[name][field])
            )
        ]
        assert found == []
