"""The checking layer itself: planted bad replies and requests are caught, opt-outs are exact,
what the spec does not describe is listed, and the test suite fails the test that broke the spec."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import stripe_standin._catalog
import stripe_standin._meters
import stripe_standin._schedules
import stripe_standin._usage
from stripe_standin import SpecChecker, StandinError, StripeStandin
from stripe_standin._endpoints import ENDPOINTS
from stripe_standin._objects import render_subscription, render_usage_record
from stripe_standin._openapi import find_operation, normalise
from stripe_standin.checking import active_checker
from tests.standin.standin_support import ACACIA, BASIL, START

pytestmark = pytest.mark.anyio

KEY = "sk_test_speccheck0000000000"
REPO = Path(__file__).resolve().parents[2]

UNCOVERED_BY_THE_SPEC: set[str] = set()
"""The stand-in's endpoints no vendored operation describes, for any API version (the
``/_standin/*`` controls are the stand-in's own, not Stripe's, and never checked). Empty: what no
published excerpt holds is derived from stripe-python (``spec/sdk_*.json``)."""

PRE_BASIL_ONLY = {
    "GET /v1/subscription_items/{id}/usage_record_summaries",
    "POST /v1/subscription_items/{id}/usage_records",
}
"""Endpoints only pre-basil documents describe: basil removed usage records, so on basil and later
no document has them (a call to them there is refused by the stand-in, as by Stripe)."""

WITHOUT_A_REPLY_SCHEMA = {
    "POST /v1/billing/meters/{id}/deactivate",
    "POST /v1/billing/meters/{id}/reactivate",
}
"""Endpoints whose request is judged but whose reply has no operation schema: the reply is a
``billing.meter``, judged as an object by the published meters excerpt."""


@pytest.fixture
async def own() -> AsyncIterator[tuple[SpecChecker, httpx.AsyncClient, StripeStandin]]:
    """A stand-in in-process with a checker of its own (so the suite's checker stays clean)."""
    checker = SpecChecker()
    standin = StripeStandin(start_time=START, spec_checker=checker)
    headers = {"Authorization": f"Bearer {KEY}", "Stripe-Version": ACACIA}
    transport = httpx.ASGITransport(app=standin.app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://standin", headers=headers
    ) as client:
        yield checker, client, standin


async def _item(client: httpx.AsyncClient) -> str:
    """A subscription item on a legacy metered price, made with valid requests."""
    customer = (await client.post("/v1/customers", data={"name": "Ada"})).json()["id"]
    product = (await client.post("/v1/products", data={"name": "Calls"})).json()["id"]
    price = (
        await client.post(
            "/v1/prices",
            data={
                "currency": "usd",
                "product": product,
                "unit_amount": "1",
                "recurring[interval]": "month",
                "recurring[usage_type]": "metered",
                "recurring[aggregate_usage]": "sum",
            },
        )
    ).json()["id"]
    sub = await client.post(
        "/v1/subscriptions", data={"customer": customer, "items[0][price]": price}
    )
    return str(sub.json()["items"]["data"][0]["id"])


class TestPlantedFaults:
    """Bad replies and bad requests are caught, on the side they happen."""

    async def test_valid_calls_pass(self, own: Any) -> None:
        """A correct usage record round trip raises nothing (the check is not all noise)."""
        checker, client, _ = own
        item = await _item(client)
        reply = await client.post(
            f"/v1/subscription_items/{item}/usage_records", data={"quantity": "2"}
        )
        assert reply.status_code == 200
        assert checker.violations == []
        assert checker.checked["request"] >= 1 and checker.checked["reply"] >= 1

    async def test_planted_bad_reply_is_caught(
        self, own: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A usage record without ``livemode`` and with a text quantity breaks the reply schema."""
        checker, client, _ = own
        item = await _item(client)
        real = render_usage_record

        def broken(record: Any) -> dict[str, Any]:
            body = real(record)
            del body["livemode"]
            body["quantity"] = str(body["quantity"])
            return body

        monkeypatch.setattr(stripe_standin._usage, "render_usage_record", broken)
        await client.post(f"/v1/subscription_items/{item}/usage_records", data={"quantity": "2"})
        problems = [str(v) for v in checker.violations]
        assert any("reply" in p and "lacks required 'livemode'" in p for p in problems), problems
        assert any("reply" in p and "quantity = '2' is not of type integer" in p for p in problems)

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            ({"event_name": "calls"}, "lacks required 'payload'"),
            (
                {"event_name": "calls", "payload[value]": "1", "colour": "red"},
                "has 'colour', which the spec does not know",
            ),
            (
                {"event_name": "calls", "payload[value]": "1", "timestamp": "soon"},
                "timestamp = 'soon' is not of type integer",
            ),
            ({"event_name": "c" * 101, "payload[value]": "1"}, "more than 100"),
        ],
    )
    async def test_planted_bad_request_is_caught(
        self, own: Any, data: dict[str, str], expected: str
    ) -> None:
        """Missing required, unknown, mistyped and over-long parameters break the request schema."""
        checker, client, _ = own
        await client.post("/v1/billing/meter_events", data=data)
        problems = [str(v) for v in checker.violations if v.side == "request"]
        assert any(expected in p for p in problems), problems

    async def test_v2_json_request_types_are_json_types(self, own: Any) -> None:
        """On the v2 stream a number where the spec wants a string is a violation (JSON types)."""
        checker, client, _ = own
        token = (await client.post("/v2/billing/meter_event_session", json={})).json()
        events = [{"event_name": "calls", "payload": {"value": 1}}]
        headers = {"Authorization": f"Bearer {token['authentication_token']}"}
        await client.post(
            "/v2/billing/meter_event_stream", json={"events": events}, headers=headers
        )
        problems = [str(v) for v in checker.violations]
        assert any("payload.value = 1 is not of type string" in p for p in problems), problems

    async def test_replies_are_judged_by_their_version(
        self, own: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The 2023-08-16 document judges pre-basil replies only: a subscription without
        ``current_period_end`` breaks it under acacia, and not basil's (basil moved the period
        to the items)."""
        checker, client, _ = own
        item = await _item(client)
        sub = (await client.get(f"/v1/subscription_items/{item}")).json()["subscription"]
        real = render_subscription

        def without_period(*args: Any) -> dict[str, Any]:
            body = real(*args)
            del body["current_period_end"]
            return body

        monkeypatch.setattr(stripe_standin._catalog, "render_subscription", without_period)
        await client.get(f"/v1/subscriptions/{sub}", headers={"Stripe-Version": BASIL})
        assert checker.violations == []
        await client.get(f"/v1/subscriptions/{sub}")
        assert any("lacks required 'current_period_end'" in str(v) for v in checker.violations)

    async def test_derived_reply_schema_catches_a_missing_field(
        self, own: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A schedule (described by stripe-python's resource classes only) without ``phases``
        breaks the derived schema, under acacia and basil alike."""
        checker, client, _ = own
        item = await _item(client)
        sub = (await client.get(f"/v1/subscription_items/{item}")).json()["subscription"]
        real = stripe_standin._schedules.render_schedule

        def without_phases(*args: Any) -> dict[str, Any]:
            body = real(*args)
            del body["phases"]
            return body

        monkeypatch.setattr(stripe_standin._schedules, "render_schedule", without_phases)
        made = await client.post("/v1/subscription_schedules", data={"from_subscription": sub})
        assert made.status_code == 200, made.text
        assert any("lacks required 'phases'" in str(v) for v in checker.violations)
        checker.clear()
        schedule = made.json()["id"]
        headers = {"Stripe-Version": BASIL}
        await client.get(f"/v1/subscription_schedules/{schedule}", headers=headers)
        assert any("lacks required 'phases'" in str(v) for v in checker.violations)

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            (
                {"currency": "usd", "unit_amount": "1", "tiers[0][up_to]": "later"},
                "params.tiers[0].up_to = 'later' matches none of the spec's alternatives",
            ),
            (
                {"currency": "usd", "transform_quantity[divide_by]": "10"},
                "params.transform_quantity lacks required 'round'",
            ),
            (
                {
                    "currency": "usd",
                    "transform_quantity[divide_by]": "1",
                    "transform_quantity[round]": "near",
                },
                "params.transform_quantity.round = 'near' is not one of ['down', 'up']",
            ),
        ],
    )
    async def test_tiered_and_transformed_prices_are_judged(
        self, own: Any, data: dict[str, str], expected: str
    ) -> None:
        """``POST /v1/prices`` with tiers and transform_quantity, judged by the derived schema
        (the stand-in may or may not take them: the request is judged either way)."""
        checker, client, _ = own
        await client.post("/v1/prices", data=data)
        problems = [str(v) for v in checker.violations if v.side == "request"]
        assert any(expected in p for p in problems), problems


class TestOptOuts:
    """A bad request sent on purpose is declared, exactly."""

    async def test_declared_bad_request_is_excused(self, own: Any) -> None:
        """Inside ``expect_invalid_requests`` the violation is excused, not counted."""
        checker, client, _ = own
        with checker.expect_invalid_requests():
            await client.post("/v1/billing/meter_events", data={"event_name": "calls"})
        assert checker.violations == []
        assert [v.problem for v in checker.excused] == ["params lacks required 'payload'"]

    async def test_opt_out_without_a_bad_request_fails(self, own: Any) -> None:
        """An opt-out around valid requests only is an error: it would hide nothing but itself."""
        checker, client, _ = own
        refused = pytest.raises(StandinError, match="no request inside the block")
        with refused, checker.expect_invalid_requests():
            await client.get("/v1/billing/meters")

    async def test_replies_are_never_excused(
        self, own: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Declaring bad requests does not excuse a bad reply sent meanwhile."""
        checker, client, _ = own
        monkeypatch.setattr(stripe_standin._meters, "render_meter", lambda meter: {"object": 1})
        with checker.expect_invalid_requests():
            await client.post("/v1/billing/meters", data={"display_name": "x"})
        assert checker.violations == []
        await client.post(
            "/v1/billing/meters",
            data={"display_name": "x", "event_name": "e", "default_aggregation[formula]": "sum"},
        )
        assert any(v.side == "reply" for v in checker.violations)

    def test_the_suite_installs_a_checker_for_every_test(self, stripe_spec: SpecChecker) -> None:
        """The autouse fixture has installed this test's checker for every stand-in."""
        assert active_checker() is stripe_spec


class TestCoverage:
    """What the vendored spec does not describe is explicit."""

    def _uncovered(self, version: str, *, reply: bool = False) -> set[str]:
        found = set()
        for method, template in ENDPOINTS:
            path = template.replace("{id}", "x_1")
            if find_operation(method, path, version, reply=reply) is None:
                found.add(f"{method} {template}")
        return found

    def test_uncovered_endpoints_are_the_listed_ones(self) -> None:
        """The endpoints no operation describes are exactly ``UNCOVERED_BY_THE_SPEC`` (and, on
        basil and later, ``PRE_BASIL_ONLY`` too): a new endpoint means a conscious entry here."""
        assert self._uncovered(ACACIA) == UNCOVERED_BY_THE_SPEC
        assert self._uncovered(BASIL) == UNCOVERED_BY_THE_SPEC | PRE_BASIL_ONLY
        assert self._uncovered(ACACIA, reply=True) == WITHOUT_A_REPLY_SCHEMA

    def test_each_version_is_judged_by_its_nearest_document(self) -> None:
        """A request is judged by the document of its era nearest its version: acacia's usage
        records by stripe-python 11's acacia params (not the 2023 excerpt), basil's prices by
        12.0's, the current version's by 16's; replies by a published excerpt when one exists."""
        usage = "/v1/subscription_items/si_1/usage_records"
        found = find_operation("POST", usage, ACACIA)
        assert found is not None and found.document.name == "sdk_2025-02-24.acacia.json"
        reply = find_operation("POST", usage, ACACIA, reply=True)
        assert reply is not None and reply.document.name == "usage_records_2023-08-16.json"
        for version, name in [
            (ACACIA, "sdk_2025-02-24.acacia.json"),
            (BASIL, "sdk_2025-03-31.basil.json"),
            ("2026-10-28.endive", "sdk_2026-10-28.endive.json"),
        ]:
            found = find_operation("POST", "/v1/prices", version)
            assert found is not None and found.document.name == name, version
        meters = find_operation("POST", "/v1/billing/meters", ACACIA)
        assert meters is not None and meters.document.name == "meters_2026-07-29.dahlia.json"

    async def test_uncovered_calls_are_counted(self, own: Any) -> None:
        """A call the spec cannot judge is counted, by side, template and era."""
        checker, client, _ = own
        item = await _item(client)
        await client.post(
            f"/v1/subscription_items/{item}/usage_records",
            data={"quantity": "1"},
            headers={"Stripe-Version": BASIL},
        )
        key = "request POST /v1/subscription_items/{id}/usage_records [basil+]"
        assert checker.uncovered[key] == 1

    def test_templates_match_despite_names(self) -> None:
        """``{id}`` in the stand-in matches ``{subscription_item}`` in the spec."""
        assert normalise("/v1/subscription_items/{id}") == normalise(
            "/v1/subscription_items/{item}"
        )


SUITE_TEST = '''
"""Run by test_spec_checker: a test that breaks Stripe's spec fails; a declared one passes."""

import anyio
import httpx

from stripe_standin import StripeStandin


def _post(data):
    async def go():
        standin = StripeStandin()
        headers = {"Authorization": "Bearer sk_test_suite0000000000"}
        transport = httpx.ASGITransport(app=standin.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=headers) as c:
            return await c.post("/v1/billing/meter_events", data=data)

    return anyio.run(go)


def test_sends_a_bad_request():
    """Breaks the spec without saying so."""
    assert _post({"event_name": "calls"}).status_code == 400


def test_declares_its_bad_request(stripe_spec):
    """Says so."""
    with stripe_spec.expect_invalid_requests():
        assert _post({"event_name": "calls"}).status_code == 400
'''


class TestSuiteWiring:
    """The suite's conftest fails the very test that broke the spec."""

    def test_a_violating_test_fails(self, tmp_path: Path) -> None:
        """In a pytest run using this suite's conftest, the undeclared bad request fails its test
        (a FAILED, not a teardown ERROR) and the declared one passes."""
        (tmp_path / "conftest.py").write_text(
            "from tests.conftest import anyio_backend, pytest_runtest_call, stripe_spec\n"
        )
        (tmp_path / "test_wiring.py").write_text(textwrap.dedent(SUITE_TEST))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert "FAILED test_wiring.py::test_sends_a_bad_request" in result.stdout, result.stdout
        assert "lacks required 'payload'" in result.stdout
        assert "1 failed, 1 passed" in result.stdout
