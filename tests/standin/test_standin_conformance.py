"""The stand-in against Stripe's published OpenAPI excerpts, vendored in ``stripe_standin/spec/``.

Runs in every clone (the excerpts are in the repository). For every implemented endpoint an
excerpt describes (v1's form-encoded ones and API v2's JSON meter event session and stream):
each parameter the stand-in accepts exists in the spec, nested ones included, and each one the
spec requires is required by the stand-in. Every endpoint is then called for real, through the
app, with a ``SpecChecker`` of its own: no request and no reply breaks the spec (the same check
every test of the suite runs on every call), and Stripe's own example objects have no field ours
lack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from stripe_standin import SpecChecker, StripeStandin
from stripe_standin._endpoints import ENDPOINTS, Endpoint
from stripe_standin._objects import OBJECT_RENDERERS
from stripe_standin.checking import objects_in
from tests.standin.conformance_support import (
    FIXTURES,
    Key,
    nested_mismatches,
    operation,
    same_json_type,
    spec_params,
)

ACACIA = "2025-02-24.acacia"
COVERED = sorted(key for key in ENDPOINTS if operation(key, ACACIA) is not None)


# ---- producing real replies ---------------------------------------------------------------------


def _steps(now: int) -> list[tuple[Key, Callable[[dict[str, str]], dict[str, str]], str | None]]:
    """Every endpoint, called once (some twice) in an order that makes each call succeed."""
    minute = now // 60 * 60

    def fixed(params: dict[str, str]) -> Callable[[dict[str, str]], dict[str, str]]:
        """Parameters that do not depend on the ids created so far."""
        return lambda ids: params

    return [
        (("POST", "/v1/customers"), fixed({"name": "A", "metadata[k]": "v"}), "customer"),
        (("GET", "/v1/customers"), fixed({}), None),
        (("GET", "/v1/customers/{id}"), fixed({}), None),
        (("POST", "/v1/products"), fixed({"name": "P"}), "product"),
        (("GET", "/v1/products"), fixed({}), None),
        (("GET", "/v1/products/{id}"), fixed({}), None),
        (
            ("POST", "/v1/billing/meters"),
            fixed(
                {
                    "display_name": "Calls",
                    "event_name": "calls",
                    "default_aggregation[formula]": "sum",
                    "customer_mapping[event_payload_key]": "stripe_customer_id",
                    "customer_mapping[type]": "by_id",
                    "value_settings[event_payload_key]": "value",
                }
            ),
            "meter",
        ),
        (("GET", "/v1/billing/meters"), fixed({}), None),
        (("GET", "/v1/billing/meters/{id}"), fixed({}), None),
        (
            ("POST", "/v1/prices"),
            lambda ids: {
                "currency": "usd",
                "product": ids["product"],
                "unit_amount_decimal": "0.5",
                "recurring[interval]": "month",
                "recurring[usage_type]": "metered",
                "recurring[meter]": ids["meter"],
            },
            "meter_price",
        ),
        (
            ("POST", "/v1/prices"),
            lambda ids: {
                "currency": "usd",
                "product": ids["product"],
                "unit_amount": "2",
                "recurring[interval]": "month",
                "recurring[usage_type]": "metered",
                "recurring[aggregate_usage]": "sum",
            },
            "price",
        ),
        (("GET", "/v1/prices"), fixed({}), None),
        (("GET", "/v1/prices/{id}"), fixed({}), None),
        (
            ("POST", "/v1/subscriptions"),
            lambda ids: {"customer": ids["customer"], "items[0][price]": ids["price"]},
            "subscription",
        ),
        (("GET", "/v1/subscriptions"), fixed({}), None),
        (("GET", "/v1/subscriptions/{id}"), fixed({}), None),
        (
            ("GET", "/v1/subscription_items"),
            lambda ids: {"subscription": ids["subscription"]},
            None,
        ),
        (("GET", "/v1/subscription_items/{id}"), fixed({}), None),
        (("POST", "/v1/subscription_items/{id}/usage_records"), fixed({"quantity": "3"}), None),
        (("GET", "/v1/subscription_items/{id}/usage_record_summaries"), fixed({}), None),
        (
            ("POST", "/v1/subscription_schedules"),
            lambda ids: {"from_subscription": ids["subscription"]},
            "schedule",
        ),
        (("GET", "/v1/subscription_schedules/{id}"), fixed({}), None),
        (
            ("POST", "/v1/subscription_schedules/{id}"),
            lambda ids: {
                "end_behavior": "release",
                "proration_behavior": "none",
                "phases[0][items][0][price]": ids["price"],
                "phases[1][items][0][price]": ids["meter_price"],
            },
            None,
        ),
        (("POST", "/v1/subscription_schedules/{id}/release"), fixed({}), None),
        (
            ("POST", "/v1/billing/meter_events"),
            lambda ids: {
                "event_name": "calls",
                "payload[stripe_customer_id]": ids["customer"],
                "payload[value]": "4",
                "identifier": "conf-1",
            },
            None,
        ),
        (
            ("GET", "/v1/billing/meters/{id}/event_summaries"),
            lambda ids: {
                "customer": ids["customer"],
                "start_time": str(minute - 3600),
                "end_time": str(minute + 120),
            },
            None,
        ),
        (
            ("POST", "/v1/billing/meter_event_adjustments"),
            fixed({"event_name": "calls", "type": "cancel", "cancel[identifier]": "conf-1"}),
            None,
        ),
        (("POST", "/v1/subscription_items/{id}"), lambda ids: {"price": ids["meter_price"]}, None),
        (("POST", "/v1/billing/meters/{id}/deactivate"), fixed({}), None),
        (("POST", "/v1/billing/meters/{id}/reactivate"), fixed({}), None),
        (
            ("POST", "/v1/test_helpers/test_clocks"),
            fixed({"frozen_time": str(now), "name": "rehearsal"}),
            "clock",
        ),
        (("GET", "/v1/test_helpers/test_clocks"), fixed({}), None),
        (
            ("POST", "/v1/test_helpers/test_clocks/{id}/advance"),
            fixed({"frozen_time": str(now + 60)}),
            None,
        ),
        (("GET", "/v1/test_helpers/test_clocks/{id}"), fixed({}), None),
        (("DELETE", "/v1/test_helpers/test_clocks/{id}"), fixed({}), None),
        (
            ("POST", "/v1/invoices/create_preview"),
            lambda ids: {
                "subscription": ids["subscription"],
                "subscription_details[items][0][id]": ids["item"],
                "subscription_details[items][0][price]": ids["price"],
                "subscription_details[proration_behavior]": "none",
            },
            None,
        ),
        # _collect moves the clock past the period's end first: one invoice to list.
        (("GET", "/v1/invoices"), lambda ids: {"subscription": ids["subscription"]}, None),
        (("GET", "/v1/invoices/{id}"), fixed({}), None),
    ]


_PATH_ID = {
    "/v1/customers/": "customer",
    "/v1/products/": "product",
    "/v1/prices/": "price",
    "/v1/subscriptions/": "subscription",
    "/v1/subscription_items/": "item",
    "/v1/subscription_schedules/": "schedule",
    "/v1/billing/meters/": "meter",
    "/v1/test_helpers/test_clocks/": "clock",
    "/v1/invoices/": "invoice",
}
#: Seconds the clock moves before a step: past the subscription's first period and its draft hour.
_ADVANCE_BEFORE: dict[Key, int] = {("GET", "/v1/invoices"): 40 * 86_400}


async def _collect_v2(
    http: httpx.AsyncClient,
    standin: StripeStandin,
    ids: dict[str, str],
    found: dict[Key, list[Any]],
) -> None:
    """API v2: a session, a stream call (one event counted, one refused later), the report event."""
    session = await http.post("/v2/billing/meter_event_session", json={})
    assert session.status_code == 200, session.text
    found.setdefault(("POST", "/v2/billing/meter_event_session"), []).append(session.json())
    events = [
        {"event_name": "calls", "payload": {"stripe_customer_id": ids["customer"], "value": "2"}},
        {
            "event_name": "calls",
            "payload": {"stripe_customer_id": "cus_nobody", "value": "1"},
            "identifier": "conf-v2",
            "timestamp": "2025-01-15T11:59:00.000Z",
        },
    ]
    token = session.json()["authentication_token"]
    stream = await http.post(
        "/v2/billing/meter_event_stream",
        json={"events": events},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert stream.status_code == 200, stream.text
    found.setdefault(("POST", "/v2/billing/meter_event_stream"), []).append(stream.json())
    (report,) = standin.report_meter_errors()
    event = await http.get(f"/v2/core/events/{report['id']}")
    assert event.status_code == 200, event.text
    found.setdefault(("GET", "/v2/core/events/{id}"), []).append(event.json())


async def _collect(checker: SpecChecker) -> dict[Key, list[Any]]:
    standin = StripeStandin(start_time=1_736_942_400, spec_checker=checker)
    found: dict[Key, list[Any]] = {}
    ids: dict[str, str] = {}
    headers = {"Authorization": "Bearer sk_test_conformance0000", "Stripe-Version": ACACIA}
    transport = httpx.ASGITransport(app=standin.app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://standin", headers=headers
    ) as http:
        for key, params_for, save_as in _steps(standin.clock.now()):
            method, template = key
            standin.clock.advance(_ADVANCE_BEFORE.get(key, 0))
            prefix = template.split("{id}")[0]
            path = template.replace("{id}", ids.get(_PATH_ID.get(prefix, ""), ""))
            params = params_for(ids)
            reply = await http.request(
                method,
                path,
                params=params if method == "GET" else None,
                data=params if method == "POST" else None,
            )
            assert reply.status_code == 200, f"{method} {path}: {reply.text}"
            body = reply.json()
            found.setdefault(key, []).append(body)
            if save_as is not None:
                ids[save_as] = body["id"]
            if key == ("GET", "/v1/invoices"):
                ids["invoice"] = body["data"][0]["id"]
            if save_as == "subscription":
                ids["item"] = body["items"]["data"][0]["id"]
        await _collect_v2(http, standin, ids, found)
    return found


@pytest.fixture(scope="module")
def checked() -> tuple[dict[Key, list[Any]], SpecChecker]:
    """Every endpoint's real 200 replies, made in-process through the app, and its checker."""
    checker = SpecChecker()
    return anyio.run(_collect, checker), checker


@pytest.fixture
def replies(checked: tuple[dict[Key, list[Any]], SpecChecker]) -> dict[Key, list[Any]]:
    """Every endpoint's real 200 replies."""
    return checked[0]


# ---- the checks ----------------------------------------------------------------------------------


class TestCoverage:
    """What the excerpts cover and that every endpoint is exercised."""

    def test_excerpts_cover_the_usage_and_meter_endpoints(self) -> None:
        """The excerpts describe the endpoints dualwrite depends on most."""
        covered = {path for _, path in COVERED}
        assert "/v1/subscription_items/{id}/usage_records" in covered
        assert "/v1/billing/meter_events" in covered
        assert "/v1/billing/meters/{id}/event_summaries" in covered
        assert "/v2/billing/meter_event_session" in covered
        assert "/v2/billing/meter_event_stream" in covered
        assert "/v1/test_helpers/test_clocks/{id}/advance" in covered

    def test_every_endpoint_is_exercised(self, replies: dict[Key, list[Any]]) -> None:
        """The reply run calls every implemented endpoint, so none escapes the checks."""
        assert set(replies) == set(ENDPOINTS)

    def test_returned_object_types_are_declared(self, replies: dict[Key, list[Any]]) -> None:
        """Every ``object`` value returned is one ``OBJECT_RENDERERS`` declares."""
        seen = {o["object"] for bodies in replies.values() for b in bodies for o in objects_in(b)}
        assert seen == set(OBJECT_RENDERERS)


def _endpoint(key: Key) -> Endpoint:
    return ENDPOINTS[key]


def _ids(key: Key) -> str:
    return f"{key[0]} {key[1]}"


class TestParameters:
    """The stand-in's parameter table against each operation in the spec."""

    @pytest.mark.parametrize("key", COVERED, ids=_ids)
    def test_accepted_parameters_exist(self, key: Key) -> None:
        """Every parameter the stand-in accepts is in the spec, and nested fields agree both ways."""
        op = operation(key, ACACIA)
        assert op is not None
        spec, _ = spec_params(op, json_body=_endpoint(key).json)
        assert sorted(set(_endpoint(key).params) - set(spec)) == []
        for name, param in _endpoint(key).params.items():
            assert nested_mismatches(param, spec[name], name) == []

    @pytest.mark.parametrize("key", COVERED, ids=_ids)
    def test_spec_required_parameters_are_required(self, key: Key) -> None:
        """Every parameter the spec requires is required by the stand-in."""
        op = operation(key, ACACIA)
        assert op is not None
        _, required = spec_params(op, json_body=_endpoint(key).json)
        ours = {name for name, param in _endpoint(key).params.items() if param.required}
        assert sorted(required - ours) == []

    def test_stream_limits(self) -> None:
        """The stream takes 1 to 100 events, as its spec describes ("up to 100 events")."""
        key = ("POST", "/v2/billing/meter_event_stream")
        events = _endpoint(key).params["events"]
        assert (events.min_items, events.max_items) == (1, 100)
        op = operation(key, ACACIA)
        assert op is not None
        description = spec_params(op, json_body=True)[0]["events"]["description"]
        assert "up to 100 events" in description


class TestReplies:
    """Real calls of every endpoint against the spec, and Stripe's own example objects."""

    def test_no_request_or_reply_breaks_the_spec(
        self, checked: tuple[dict[Key, list[Any]], SpecChecker]
    ) -> None:
        """Every call of the run passes the checking layer, and every covered endpoint's request
        and reply were checked against a schema."""
        _, checker = checked
        assert checker.violations == [], checker.report()
        assert checker.checked["request"] >= len(COVERED)
        assert checker.checked["reply"] >= len(COVERED)

    def test_fixture_fields_are_present(self, replies: dict[Key, list[Any]]) -> None:
        """Every field of Stripe's own fixture objects appears in ours, with the same JSON type."""
        ours: dict[str, dict[str, Any]] = {}
        for bodies in replies.values():
            for obj in (o for b in bodies for o in objects_in(b)):
                ours.setdefault(obj["object"], obj)
        found = []
        for name, fixture in FIXTURES.items():
            mine = ours[name]
            for field, value in fixture.items():
                if field not in mine:
                    found.append(f"{name}.{field} missing")
                elif None not in (value, mine[field]) and not same_json_type(value, mine[field]):
                    found.append(f"{name}.{field}: {mine[field]!r} vs fixture {value!r}")
        assert found == []
