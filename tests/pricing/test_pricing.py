"""Price math against a table of cases worked out by hand from Stripe's pricing documentation.

Each case names the page its numbers come from. The prices are written as Stripe returns them
(``price`` objects, ``tiers`` expanded), in ``tests/pricing/pricing_cases.json``: the stand-in's own price
math reaches the same amounts independently (tests/standin/test_standin_pricing.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from dualwrite.exceptions import PriceError
from dualwrite.pricing import (
    MeterEvent,
    Price,
    UsageRecord,
    billed_legacy_usage,
    billed_meter_usage,
    format_amount,
)

PAY_AS_YOU_GO = "docs.stripe.com/billing/subscriptions/usage-based/use-cases/pay-as-you-go"
AGGREGATE = "docs.stripe.com/api/prices/object#price_object-recurring-aggregate_usage (acacia)"
METERS = PAY_AS_YOU_GO + " (Create a meter: Sum, Count, Last)"


def price(**fields: Any) -> dict[str, Any]:
    """A metered ``price`` object as Stripe returns it, with ``fields`` over the defaults."""
    base: dict[str, Any] = {
        "id": "price_test",
        "object": "price",
        "billing_scheme": "per_unit",
        "currency": "usd",
        "custom_unit_amount": None,
        "recurring": {
            "aggregate_usage": "sum",
            "interval": "month",
            "interval_count": 1,
            "meter": None,
            "usage_type": "metered",
        },
        "tiers_mode": None,
        "transform_quantity": None,
        "unit_amount": None,
        "unit_amount_decimal": None,
    }
    return base | fields


def tier(
    up_to: int | None,
    unit: int | None = None,
    flat: int | None = None,
    *,
    unit_decimal: str | None = None,
    flat_decimal: str | None = None,
) -> dict[str, Any]:
    """A tier as Stripe renders it: amounts in cents, the ``*_decimal`` ones as strings."""
    return {
        "up_to": up_to,
        "unit_amount": unit,
        "unit_amount_decimal": unit_decimal or (None if unit is None else str(unit)),
        "flat_amount": flat,
        "flat_amount_decimal": flat_decimal or (None if flat is None else str(flat)),
    }


def tiered(mode: str, *tiers: dict[str, Any]) -> dict[str, Any]:
    """A tiered price object (tiers expanded)."""
    return price(billing_scheme="tiered", tiers_mode=mode, tiers=list(tiers))


def per_unit(amount: int | str, **fields: Any) -> dict[str, Any]:
    """A per-unit price object: an int is ``unit_amount``, a string ``unit_amount_decimal``."""
    if isinstance(amount, int):
        return price(unit_amount=amount, unit_amount_decimal=str(amount), **fields)
    return price(unit_amount=None, unit_amount_decimal=amount, **fields)


# The fonts of both tiered-pricing pages: 1-5 at 7 USD, 6-10 at 6.50 USD, 11+ at 6 USD.
FONTS = (tier(5, 700), tier(10, 650), tier(None, 600))
# The flat-fee example: 5 USD + 10 USD flat, 4 USD + 20 USD flat, 3 USD + 30 USD flat.
FLAT = (tier(5, 500, 1000), tier(10, 400, 2000), tier(None, 300, 3000))
CAR_RENTAL = {"divide_by": 60, "round": "up"}


#: The hand-worked table, shared with the stand-in's own price math
#: (tests/standin/test_standin_pricing.py): each case names its page.
CASES_FILE = Path(__file__).with_name("pricing_cases.json")


@dataclass(frozen=True)
class Case:
    """One hand-worked case: a price, a billed quantity, and what Stripe bills (in cents)."""

    name: str
    page: str
    price: dict[str, Any]
    quantity: int
    cents: int


def load_cases() -> list[Case]:
    """The table's cases, from ``pricing_cases.json``."""
    return [Case(**case) for case in json.loads(CASES_FILE.read_text())["cases"]]


CASES = load_cases()


class TestHandWorkedTable:
    """Every case of the table bills what Stripe's documentation says, to the cent."""

    def test_every_case_names_its_page(self):
        """The shared table is read whole, and each case cites Stripe's documentation."""
        assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)
        assert all(case.page.startswith("docs.stripe.com/") for case in CASES)

    @pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
    def test_amount(self, case: Case):
        """The price bills the case's amount for its quantity (see ``case.page``)."""
        assert Price.from_stripe(case.price).amount(case.quantity) == case.cents, case.page

    def test_exact_amount_before_rounding(self):
        """The exact amount keeps the fraction Stripe rounds away (1.5 cents)."""
        assert Price.from_stripe(per_unit("0.05")).exact_amount(30) == Decimal("1.5")

    def test_stripe_fixture_price(self):
        """Stripe's own example price (fixtures3.json, 2026-07-29.dahlia: 2000 cents per package of
        1592560163, rounded down) bills whole packages only."""
        fixture = {
            "id": "price_1PgafmB7WZ01zgkW6dKueIc5",
            "object": "price",
            "billing_scheme": "per_unit",
            "currency": "usd",
            "custom_unit_amount": {"maximum": None, "minimum": None, "preset": None},
            "recurring": {"interval": "month", "interval_count": 1, "meter": None},
            "tiers_mode": None,
            "transform_quantity": {"divide_by": 1592560163, "round": "down"},
            "type": "recurring",
            "unit_amount": 2000,
            "unit_amount_decimal": "2000",
        }
        parsed = Price.from_stripe(fixture)
        assert parsed.amount(1592560162) == 0
        assert parsed.amount(3 * 1592560163 + 5) == 6000


PERIOD: dict[str, int] = {"start": 1000, "end": 2000}
RECORDS = [
    UsageRecord(900, 50),  # before the period: only last_ever sees it
    UsageRecord(1100, 3),
    UsageRecord(1100, 4),  # increments at one timestamp add up: 7
    UsageRecord(1500, 9),
    UsageRecord(1700, 2),
    UsageRecord(1500, 1, "set"),  # set overwrites the quantity at 1500: 9 becomes 1
    UsageRecord(2000, 100),  # at the end: the next period's
]

EVENTS = [
    MeterEvent(990, 40),
    MeterEvent(1100, 5),
    MeterEvent(1800, 2),
    MeterEvent(1800, 6),  # same second: the one received last is the last
    MeterEvent(1300, 9),
    MeterEvent(2000, 70),
]


class TestBilledQuantity:
    """Raw usage to the quantity a price bills, for each aggregation and formula."""

    @pytest.mark.parametrize(
        ("mode", "expected"),
        [("sum", 7 + 1 + 2), ("max", 7), ("last_during_period", 2), ("last_ever", 2)],
    )
    def test_aggregate_usage(self, mode: str, expected: int):
        """sum, max, last_during_period and last_ever over one item's records (AGGREGATE)."""
        assert billed_legacy_usage(RECORDS, mode, **PERIOD) == expected

    def test_last_ever_carries_an_earlier_period(self):
        """A period without usage bills the last usage ever reported under last_ever, and 0 under
        last_during_period (AGGREGATE)."""
        earlier = [UsageRecord(900, 50)]
        assert billed_legacy_usage(earlier, "last_ever", **PERIOD) == 50
        assert billed_legacy_usage(earlier, "last_during_period", **PERIOD) == 0
        assert billed_legacy_usage([], "max", **PERIOD) == 0

    @pytest.mark.parametrize(("formula", "expected"), [("sum", 22), ("count", 4), ("last", 6)])
    def test_meter_formula(self, formula: str, expected: int):
        """sum, count and last over the customer's events in the period (METERS)."""
        assert billed_meter_usage(EVENTS, formula, **PERIOD) == expected

    def test_meter_last_without_events_bills_zero(self):
        """A period without events: last is 0 (unlike legacy last_ever)."""
        assert billed_meter_usage([], "last", **PERIOD) == 0

    def test_unknown_aggregation_is_refused(self):
        """An aggregation Stripe does not have is an error naming the choices."""
        with pytest.raises(PriceError, match="sum, max, last_during_period, last_ever"):
            billed_legacy_usage([], "avg", **PERIOD)
        with pytest.raises(PriceError, match="sum, count, last"):
            billed_meter_usage([], "max", **PERIOD)

    def test_billed_quantity_through_a_price(self):
        """Usage aggregated by the price's aggregation, then priced: the graduated fonts at the
        period's max of 7 bill 35 + 2 x 6.50 USD."""
        fonts = Price.from_stripe(tiered("graduated", *FONTS))
        assert fonts.amount(billed_legacy_usage(RECORDS, "max", **PERIOD)) == 4800


class TestParsing:
    """Stripe's price objects, and what cannot be billed, with errors naming the field."""

    def test_fields(self):
        """A meter-backed tiered price keeps its meter, interval, tiers and mode."""
        data = tiered("volume", *FONTS) | {
            "recurring": {"interval": "month", "interval_count": 3, "meter": "mtr_1"},
            "product": {"id": "prod_1", "object": "product"},
            "lookup_key": "fonts",
        }
        parsed = Price.from_stripe(data)
        assert (parsed.meter, parsed.interval, parsed.interval_count) == ("mtr_1", "month", 3)
        assert (parsed.product, parsed.lookup_key, parsed.tiers_mode) == (
            "prod_1",
            "fonts",
            "volume",
        )
        assert [t.up_to for t in parsed.tiers] == [5, 10, None]

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (price(billing_scheme="tiered", tiers_mode="volume"), "expand\\[\\]=tiers"),
            (tiered("stepped", *FONTS), "tiers_mode graduated or volume"),
            (tiered("volume", tier(5, 700), tier(3, 650), tier(None, 600)), "tiers\\[1\\].up_to"),
            (tiered("volume", tier(5, 700), tier(10, 600)), "last tier must have up_to inf"),
            (tiered("volume", tier(None, 700), tier(None, 600)), "only the last tier"),
            (tiered("volume", tier(None)), "tiers\\[0\\] needs a unit amount"),
            (tiered("volume", *FONTS) | {"transform_quantity": CAR_RENTAL}, "transform_quantity"),
            (price(), "needs unit_amount or unit_amount_decimal"),
            (per_unit("-1"), "unit_amount_decimal must be a finite amount of 0 or more"),
            (per_unit("abc"), "unit_amount_decimal must be a decimal number"),
            (per_unit(5, currency="dollars"), "currency must be a three-letter code"),
            (per_unit(5, transform_quantity={"divide_by": 0, "round": "up"}), "divide_by"),
            (per_unit(5, transform_quantity={"divide_by": 2, "round": "half"}), "round must be up"),
            (per_unit(5, billing_scheme="package"), "per_unit or tiered"),
            (per_unit(5, custom_unit_amount={"preset": 500}), "custom_unit_amount"),
        ],
    )
    def test_unbillable_prices_are_refused(self, data: dict[str, Any], message: str):
        """A price dualwrite cannot bill is a PriceError naming the price and the field."""
        with pytest.raises(PriceError, match=message) as caught:
            Price.from_stripe(data)
        assert "price_test" in str(caught.value)

    @pytest.mark.parametrize("quantity", [-1, Decimal("NaN"), 1.5, True])
    def test_bad_quantity(self, quantity: Any):
        """A negative, non-finite or float quantity is refused, never billed."""
        with pytest.raises(PriceError, match="quantity"):
            Price.from_stripe(per_unit(5)).amount(quantity)


class TestComparingPrices:
    """Whether two prices bill the same, and the parameters of a twin."""

    def test_same_terms_whatever_the_meter(self):
        """A meter-backed twin of a legacy price bills the same: no differences."""
        legacy = Price.from_stripe(tiered("graduated", *FLAT))
        twin = Price.from_stripe(
            tiered("graduated", *FLAT)
            | {"id": "price_twin", "recurring": {"interval": "month", "meter": "mtr_1"}}
        )
        assert legacy.differences(twin) == []

    def test_differences_are_named(self):
        """Currency, interval, amounts and tiers each show up."""
        legacy = Price.from_stripe(tiered("volume", *FONTS))
        other = Price.from_stripe(
            tiered("graduated", *FONTS)
            | {"currency": "eur", "recurring": {"interval": "year", "interval_count": 1}}
        )
        found = " ".join(legacy.differences(other))
        for name in ("currency 'eur'", "interval '1 year'", "tiers_mode 'graduated'"):
            assert name in found

    def test_billing_params_round_trip(self):
        """The create parameters of a twin describe a price billing exactly the same."""
        for data in (
            tiered("graduated", *FLAT),
            tiered(
                "volume",
                tier(1, None, None, unit_decimal="0.5"),
                tier(None, 2, None, flat_decimal="0.25"),
            ),
            per_unit("0.05"),
            per_unit(1000, transform_quantity=CAR_RENTAL),
        ):
            original = Price.from_stripe(data)
            params = original.billing_params()
            echoed = price(id="price_twin", **params) | {
                "recurring": params["recurring"],
                "unit_amount_decimal": params.get("unit_amount_decimal"),
            }
            for entry in echoed.get("tiers") or []:
                entry["up_to"] = None if entry["up_to"] == "inf" else entry["up_to"]
            assert original.differences(Price.from_stripe(echoed)) == []


@pytest.mark.parametrize(
    ("amount", "currency", "signed", "text"),
    [
        (1234, "usd", False, "12.34 USD"),
        (-4, "usd", True, "-0.04 USD"),
        (4, "eur", True, "+0.04 EUR"),
        (1234, "jpy", False, "1,234 JPY"),
        (1234, "kwd", False, "1.234 KWD"),
    ],
)
def test_format_amount(amount: int, currency: str, signed: bool, text: str):
    """Amounts in the smallest unit are shown in the currency's own decimals."""
    assert format_amount(amount, currency, signed=signed) == text
