"""The stand-in prices and invoices: tiered, transformed and decimal prices, the hand-worked table
(shared with dualwrite's price math, through ``tests/pricing_cases.json``) billed by the stand-in's
own math, its period-end invoices, ``GET /v1/invoices`` and invoice previews of a price swap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.standin.standin_support import START

pytestmark = pytest.mark.anyio

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "pricing_cases.json").read_text()
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
                if tier[name] is not None:
                    form[f"tiers[{index}][{name}]"] = tier[name]
                elif tier[f"{name}_decimal"] is not None:
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
                "transform_quantity",
                "billing_scheme=tiered",
            ),
            ({"tiers[0][unit_amount]": None}, "tiers[0][unit_amount]", "needs `unit_amount`"),
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
        error = await refused(http, "/v1/prices", {k: v for k, v in form.items() if v is not None})
        assert error.get("param") == param and words in error["message"], error

    async def test_divide_by_must_be_positive(self, http: httpx.AsyncClient, product: str) -> None:
        """``transform_quantity[divide_by]=0`` is refused as Stripe refuses integers out of range."""
        form: dict[str, Any] = {"currency": "usd", "product": product, "unit_amount": 5}
        form |= {"transform_quantity[divide_by]": 0, "transform_quantity[round]": "up"}
        error = await refused(http, "/v1/prices", form)
        assert error["param"] == "transform_quantity[divide_by]"
