"""Late refusals as Stripe reports them: signed thin events to event destinations, and the full
events behind them, read through stripe-python."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stripe_standin import RunningStandin, SpecChecker, StandinError, StripeStandin, serve_app
from tests.standin.standin_support import (
    API_KEY,
    SDK_WARNING,
    Scenario,
    new_session_token,
    stream_events,
    v2_event,
)

pytestmark = [pytest.mark.anyio, SDK_WARNING]

SECRET = "whsec_standin_test_secret"
REPORT = "v1.billing.meter.error_report_triggered"
NO_METER = "v1.billing.meter.no_meter_found"


@dataclass
class Receiver:
    """A webhook endpoint on a real socket that keeps what it was sent."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fetched: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def hook(self) -> str:
        """The URL to register as an event destination."""
        return f"{self.url}/hook"


def _receiver_app(receiver: Receiver, standin_url: str | None) -> Starlette:
    """Record each delivery; with ``standin_url``, also verify it and fetch the full event back
    from the stand-in through the SDK, as dualwrite's receiver will, while the report runs
    (by id: see ``test_fetch_event_async_sends_usage`` for why not ``fetch_event_async``)."""

    async def hook(request: Request) -> Response:
        """Take one delivery."""
        body = await request.body()
        with receiver.lock:
            receiver.received.append((dict(request.headers), body))
        if standin_url is None:
            return JSONResponse({"received": True})
        http_client = stripe.HTTPXClient()
        client = stripe.StripeClient(
            API_KEY, base_addresses={"api": standin_url}, http_client=http_client
        )
        try:
            notification = client.parse_event_notification(
                body, request.headers["stripe-signature"], SECRET
            )
            event = await client.v2.core.events.retrieve_async(notification.id)
        finally:
            await http_client.close_async()  # type: ignore[no-untyped-call]
        with receiver.lock:
            receiver.fetched.append(event.to_dict())
        return JSONResponse({"received": True})

    return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A recording receiver, served in its own thread."""
    found = Receiver()
    with serve_app(_receiver_app(found, None)) as url:
        found.url = url
        yield found


async def _refuse_some(client: stripe.StripeClient, scenario: Scenario) -> None:
    """Stream two good events and four that Stripe would refuse later."""
    token = await new_session_token(client)
    no_customer = v2_event(scenario, "1", identifier="no-customer")
    del no_customer["payload"]["stripe_customer_id"]
    await stream_events(
        client,
        token,
        [
            v2_event(scenario, "3", identifier="good-1"),
            v2_event(scenario, "1", identifier="stranger-1", customer="cus_nobody"),
            v2_event(scenario, "1", identifier="stranger-2", customer="cus_nobody"),
            no_customer,
            v2_event(scenario, "1", identifier="lost", event_name="nobody_listens"),
            v2_event(scenario, "4", identifier="good-2"),
        ],
    )


def _samples(event: dict[str, Any]) -> dict[str, list[str]]:
    """Sample identifiers per error code in a full error report event."""
    return {
        kind["code"]: [s["request"]["identifier"] for s in kind["sample_errors"]]
        for kind in event["data"]["reason"]["error_types"]
    }


class TestReports:
    """``report_meter_errors``: one event per meter, delivered signed, retrievable."""

    async def test_delivery_is_signed_and_thin(
        self,
        client: stripe.StripeClient,
        scenario: Scenario,
        standin: StripeStandin,
        receiver: Receiver,
    ) -> None:
        """Each destination gets the thin payload, signed so that stripe-python verifies it."""
        destination = standin.add_event_destination(receiver.hook, SECRET)
        await _refuse_some(client, scenario)
        events = standin.report_meter_errors()
        assert [e["type"] for e in events] == [REPORT, NO_METER]
        assert len(receiver.received) == 2
        headers, body = receiver.received[0]
        header = headers["stripe-signature"]
        assert stripe.WebhookSignature.verify_header(body, header, SECRET, 300) is True
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.WebhookSignature.verify_header(body, header, "whsec_other", 300)
        thin = json.loads(body)
        assert thin == {
            "id": events[0]["id"],
            "object": "v2.core.event",
            "context": None,
            "created": events[0]["created"],
            "livemode": False,
            "reason": None,
            "related_object": {
                "id": scenario.meter,
                "type": "billing.meter",
                "url": f"/v1/billing/meters/{scenario.meter}",
            },
            "type": REPORT,
        }
        assert "related_object" not in json.loads(receiver.received[1][1])
        deliveries = standin.event_deliveries
        assert [(d["destination"], d["status"], d["error"]) for d in deliveries] == [
            (destination, 200, None),
            (destination, 200, None),
        ]

    async def test_sdk_parses_and_retrieves(
        self,
        client: stripe.StripeClient,
        scenario: Scenario,
        standin: StripeStandin,
        receiver: Receiver,
    ) -> None:
        """The SDK parses the notification and retrieves the full event: its samples are exactly
        the refused identifiers."""
        standin.add_event_destination(receiver.hook, SECRET)
        await _refuse_some(client, scenario)
        standin.report_meter_errors()
        headers, body = receiver.received[0]
        notification = client.parse_event_notification(body, headers["stripe-signature"], SECRET)
        assert notification.type == REPORT
        assert notification.related_object.id == scenario.meter  # type: ignore[union-attr]
        event = await client.v2.core.events.retrieve_async(notification.id)
        assert isinstance(event, stripe.events.V1BillingMeterErrorReportTriggeredEvent)
        data = event.data
        assert data.reason.error_count == 3
        assert data.developer_message_summary == "There are 3 invalid events"
        assert _samples(event.to_dict()) == {
            "meter_event_customer_not_found": ["stranger-1", "stranger-2"],
            "meter_event_no_customer_defined": ["no-customer"],
        }
        assert [t.error_count for t in data.reason.error_types] == [2, 1]
        start = datetime.fromisoformat(data.validation_start)
        assert start <= datetime.fromisoformat(data.validation_end)
        assert event.related_object.url == f"/v1/billing/meters/{scenario.meter}"
        no_meter = await client.v2.core.events.retrieve_async(
            json.loads(receiver.received[1][1])["id"]
        )
        assert _samples(no_meter.to_dict()) == {"no_meter": ["lost"]}
        assert no_meter.data.developer_message_summary == "There is 1 invalid event"  # type: ignore[attr-defined]

    async def test_reports_are_incremental(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A report covers only errors found since the last one; none means no event."""
        assert standin.report_meter_errors() == []
        await _refuse_some(client, scenario)
        assert len(standin.report_meter_errors()) == 2
        assert standin.report_meter_errors() == []
        token = await new_session_token(client)
        await stream_events(client, token, [v2_event(scenario, "x", identifier="bad-value")])
        (event,) = standin.report_meter_errors()
        assert _samples(event) == {"meter_event_invalid_value": ["bad-value"]}
        assert standin.state()["counts"]["unreported_async_errors"] == 0

    async def test_receiver_fetching_during_control_report(
        self, running: RunningStandin, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """Triggered over HTTP, the report leaves the stand-in free to serve receivers that fetch
        the event while their delivery is still open."""
        fetching = Receiver()
        with serve_app(_receiver_app(fetching, running.url)) as url:
            fetching.url = url
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as raw:
                added = await raw.post(
                    "/_standin/event_destinations", json={"url": fetching.hook, "secret": SECRET}
                )
                assert added.status_code == 200
                await _refuse_some(client, scenario)
                reply = await raw.post("/_standin/meter_errors/report")
        assert [e["type"] for e in reply.json()["events"]] == [REPORT, NO_METER]
        assert [e["type"] for e in fetching.fetched] == [REPORT, NO_METER]
        assert _samples(fetching.fetched[0])["meter_event_customer_not_found"] == [
            "stranger-1",
            "stranger-2",
        ]

    async def test_unreachable_destination(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A destination that does not answer is logged, and the report still goes out."""
        with serve_app(Starlette()) as closed:
            pass  # the port is free again: nothing listens there any more
        standin.add_event_destination(f"{closed}/hook", SECRET)
        await _refuse_some(client, scenario)
        events = standin.report_meter_errors(timeout=2)
        assert len(events) == 2
        (first, _) = standin.event_deliveries
        assert first["status"] is None
        assert first["error"].startswith("ConnectError")

    async def test_fetch_event_async_sends_usage(
        self,
        client: stripe.StripeClient,
        scenario: Scenario,
        standin: StripeStandin,
        stripe_spec: SpecChecker,
    ) -> None:
        """stripe-python 16.1's ``fetch_event_async`` leaks its ``usage`` tag into the query
        (``raw_request_async`` does not pop it, unlike ``raw_request``); the stand-in refuses
        unknown parameters here as everywhere, so fetch by id (what Stripe does is UNVERIFIED)."""
        await _refuse_some(client, scenario)
        event = standin.report_meter_errors()[0]
        notification = client.parse_event_notification_without_verification(json.dumps(event))
        refused = pytest.raises(stripe.InvalidRequestError, match="unknown parameter: usage")
        with stripe_spec.expect_invalid_requests(), refused:  # the spec knows no `usage` either
            await notification.fetch_event_async()
        assert standin.requests[-1].params == {
            "usage": {"0": "pushed_event_pull", "1": "pushed_event_pull_async"}
        }

    async def test_unknown_event(self, client: stripe.StripeClient) -> None:
        """Retrieving an event the stand-in never sent is a 404."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await client.v2.core.events.retrieve_async("evt_test_nope")
        assert caught.value.http_status == 404


class TestDestinations:
    """Registering event destinations."""

    async def test_register(self, running: RunningStandin, standin: StripeStandin) -> None:
        """Destinations are listed; bad ones are refused, in Python and over HTTP."""
        destination = standin.add_event_destination("http://127.0.0.1:9/hook", SECRET)
        assert standin.event_destinations == [
            {"id": destination, "url": "http://127.0.0.1:9/hook", "secret": SECRET}
        ]
        with pytest.raises(StandinError):
            standin.add_event_destination("ftp://example.com", SECRET)
        with pytest.raises(StandinError):
            standin.add_event_destination("http://127.0.0.1:9/hook", " ")
        async with httpx.AsyncClient(base_url=running.url) as raw:
            refused = await raw.post("/_standin/event_destinations", json={"url": "x"})
        assert refused.status_code == 400
        assert standin.state()["counts"]["event_destinations"] == 1


class TestRefuseLater:
    """``refuse_later``: an accepted, counted event refused after the fact."""

    async def test_v1_event_refused_later(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """The event stops counting and appears in the next report, with its identifier."""
        for identifier, value in (("keep", "2"), ("late", "5")):
            await client.v1.billing.meter_events.create_async(
                {
                    "event_name": scenario.event_name,
                    "payload": {"stripe_customer_id": scenario.customer, "value": value},
                    "identifier": identifier,
                }
            )
        error = standin.refuse_later("late")
        assert error["code"] == "meter_event_customer_not_found"
        assert scenario.customer in error["message"]
        assert standin.meter_total(scenario.customer, scenario.event_name) == 2.0
        assert [e["counted"] for e in standin.meter_events()] == [True, False]
        (event,) = standin.report_meter_errors()
        assert event["related_object"]["id"] == scenario.meter
        assert _samples(event) == {"meter_event_customer_not_found": ["late"]}

    async def test_streamed_event_refused_over_http(
        self,
        running: RunningStandin,
        client: stripe.StripeClient,
        scenario: Scenario,
        standin: StripeStandin,
    ) -> None:
        """The control endpoint refuses a streamed event with a chosen code and message."""
        token = await new_session_token(client)
        await stream_events(client, token, [v2_event(scenario, "9", identifier="s1")])
        async with httpx.AsyncClient(base_url=running.url) as raw:
            reply = await raw.post(
                "/_standin/meter_errors/refuse",
                json={"identifier": "s1", "code": "meter_event_invalid_value", "message": "No."},
            )
            again = await raw.post("/_standin/meter_errors/refuse", json={"identifier": "s1"})
        assert reply.json()["error"]["message"] == "No."
        assert again.status_code == 400
        assert standin.meter_total(scenario.customer, scenario.event_name) == 0.0
        (event,) = standin.report_meter_errors()
        assert event["data"]["reason"]["error_types"][0]["sample_errors"] == [
            {"error_message": "No.", "request": {"identifier": "s1"}}
        ]

    @pytest.mark.parametrize(
        ("identifier", "code"),
        [("nobody", "meter_event_customer_not_found"), ("stranger-1", "no_meter"), ("good-1", "x")],
    )
    async def test_refused(
        self,
        client: stripe.StripeClient,
        scenario: Scenario,
        standin: StripeStandin,
        identifier: str,
        code: str,
    ) -> None:
        """Unknown identifiers, events not counted and unknown codes are set-up errors."""
        await _refuse_some(client, scenario)
        with pytest.raises(StandinError):
            standin.refuse_later(identifier, code=code)
