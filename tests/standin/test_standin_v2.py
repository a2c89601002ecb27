"""API v2's meter event path through stripe-python: sessions, the stream, async errors, faults."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import stripe

from stripe_standin import FaultInjector, RunningStandin, SpecChecker, StripeStandin
from tests.standin.standin_support import (
    ACACIA,
    API_KEY,
    SDK_WARNING,
    START,
    Scenario,
    new_session_token,
    stream_events,
    v2_event,
)

pytestmark = [pytest.mark.anyio, SDK_WARNING]

SESSION = "/v2/billing/meter_event_session"
STREAM = "/v2/billing/meter_event_stream"
DAY = 86_400


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat()


async def _raw_stream(running: RunningStandin, token: str, body: Any) -> httpx.Response:
    """POST ``body`` (JSON, or raw bytes) to the stream with ``token``."""
    headers = {"Authorization": f"Bearer {token}", "Stripe-Version": ACACIA}
    async with httpx.AsyncClient(base_url=running.url, headers=headers) as raw:
        if isinstance(body, bytes):
            return await raw.post(STREAM, content=body)
        return await raw.post(STREAM, json=body)


class TestSessions:
    """``POST /v2/billing/meter_event_session`` and the token's life."""

    async def test_session_through_the_sdk(
        self, client: stripe.StripeClient, standin: StripeStandin
    ) -> None:
        """The SDK creates a session with the secret key: a token valid for 15 minutes."""
        session = await client.v2.billing.meter_event_session.create_async()
        assert session.object == "v2.billing.meter_event_session"
        assert session.id.startswith("mes_")
        assert session.authentication_token.startswith("meses_")
        assert session.livemode is False
        created = datetime.fromisoformat(session.created)
        expires = datetime.fromisoformat(session.expires_at)
        assert expires - created == timedelta(minutes=15)
        assert abs(created.timestamp() - START) < 5
        (entry,) = standin.requests
        assert (entry.method, entry.path, entry.status) == ("POST", SESSION, 200)

    async def test_session_needs_the_secret_key(
        self, running: RunningStandin, client: stripe.StripeClient
    ) -> None:
        """A session token cannot create sessions: only an API key can."""
        token = await new_session_token(client)
        async with httpx.AsyncClient(base_url=running.url) as raw:
            reply = await raw.post(SESSION, json={}, headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 401

    async def test_expires_after_fifteen_minutes(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """On the stand-in's clock a token works for 15 minutes, then the SDK raises
        ``TemporarySessionExpiredError``."""
        token = await new_session_token(client)
        standin.clock.advance(15 * 60 - 5)
        await stream_events(client, token, [v2_event(scenario, "1")])
        standin.clock.advance(10)
        with pytest.raises(stripe.TemporarySessionExpiredError) as caught:
            await stream_events(client, token, [v2_event(scenario, "1")])
        assert caught.value.http_status == 401
        assert caught.value.code == "billing_meter_event_session_expired"
        assert standin.meter_total(scenario.customer, scenario.event_name) == 1.0

    async def test_expire_all_then_renew(
        self,
        running: RunningStandin,
        client: stripe.StripeClient,
        scenario: Scenario,
        standin: StripeStandin,
    ) -> None:
        """``expire_meter_sessions`` (or its control endpoint) ends every token; a new session
        carries on mid-stream."""
        token = await new_session_token(client)
        await stream_events(client, token, [v2_event(scenario, "2", identifier="a")])
        assert standin.expire_meter_sessions() == 1
        with pytest.raises(stripe.TemporarySessionExpiredError):
            await stream_events(client, token, [v2_event(scenario, "3", identifier="b")])
        renewed = await new_session_token(client)
        await stream_events(client, renewed, [v2_event(scenario, "3", identifier="b")])
        async with httpx.AsyncClient(base_url=running.url) as raw:
            expired = await raw.post("/_standin/meter_sessions/expire")
        assert expired.json() == {"expired": 1}
        with pytest.raises(stripe.TemporarySessionExpiredError):
            await stream_events(client, renewed, [v2_event(scenario, "4")])
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0

    async def test_unknown_token_shape(self, running: RunningStandin) -> None:
        """An unknown token gets v2's ``temporary_session_expired`` error, with its doc URL."""
        reply = await _raw_stream(running, "meses_nobody", {"events": []})
        assert reply.status_code == 401
        error = reply.json()["error"]
        assert error["type"] == "temporary_session_expired"
        assert error["code"] == "billing_meter_event_session_expired"
        assert error["message"] == "The temporary session token has expired."
        assert error["doc_url"].startswith("https://")

    async def test_secret_key_on_the_stream(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """The secret key is refused on the stream: a plain ``AuthenticationError``, so a client
        does not mistake it for an expiry to renew."""
        with pytest.raises(stripe.AuthenticationError) as caught:
            await stream_events(client, API_KEY, [v2_event(scenario, "1")])
        assert not isinstance(caught.value, stripe.TemporarySessionExpiredError)
        assert caught.value.http_status == 401
        assert standin.meter_events() == []


class TestStream:
    """``POST /v2/billing/meter_event_stream``: structure now, everything else later."""

    async def test_hundred_events_counted(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """One call of 100 events is counted like 100 v1 events, and logged with its count."""
        token = await new_session_token(client)
        events = [v2_event(scenario, str(n), identifier=f"e{n}") for n in range(1, 101)]
        await stream_events(client, token, events)
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5050.0
        assert len(standin.meter_events(customer=scenario.customer)) == 100
        entry = standin.requests[-1]
        assert (entry.path, entry.status, entry.event_count) == (STREAM, 200, 100)
        assert entry.idempotency_key  # the SDK sends one on every v2 POST

    async def test_reply_is_empty_object(
        self, running: RunningStandin, client: stripe.StripeClient, scenario: Scenario
    ) -> None:
        """The stream answers ``{}``."""
        token = await new_session_token(client)
        reply = await _raw_stream(running, token, {"events": [v2_event(scenario, "1")]})
        assert (reply.status_code, reply.json()) == (200, {})

    async def test_hundred_and_one_refused(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """101 events are refused whole, with v2's ``invalid_fields``; none is counted."""
        token = await new_session_token(client)
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await stream_events(client, token, [v2_event(scenario, "1")] * 101)
        assert caught.value.code == "invalid_fields"
        assert caught.value.http_status == 400
        assert standin.meter_events() == []
        assert standin.requests[-1].event_count == 101

    @pytest.mark.parametrize(
        ("body", "mentions", "spec_refuses"),
        [
            (b"events=1", "JSON", False),  # not JSON: nothing the spec can judge
            ([1, 2], "JSON object", False),
            ({}, "events", True),
            ({"events": []}, "at least 1", False),  # the spec states no minimum
            ({"events": "x"}, "events", True),
            ({"events": [{"payload": {"value": "1"}}]}, "events[0][event_name]", True),
            ({"events": [{"event_name": "api_calls"}]}, "events[0][payload]", True),
            (
                {"events": [{"event_name": "api_calls", "payload": {"v": 1}}]},
                "[payload][v]",
                True,
            ),
            # The spec lets events carry other fields; the stand-in refuses them (UNVERIFIED).
            ({"events": [{"event_name": "e", "payload": {}, "when": "now"}]}, "[when]", False),
            (
                {"events": [{"event_name": "e", "payload": {}, "timestamp": "soon"}]},
                "timestamp",
                True,
            ),
            ({"events": [{"event_name": "e", "payload": {}, "timestamp": 1}]}, "timestamp", True),
            ({"events": [], "extra": 1}, "extra", True),
        ],
    )
    async def test_structural_errors(
        self,
        running: RunningStandin,
        client: stripe.StripeClient,
        standin: StripeStandin,
        stripe_spec: SpecChecker,
        body: Any,
        mentions: str,
        spec_refuses: bool,
    ) -> None:
        """Malformed requests are a 400 in v2's shape, naming what is wrong (those Stripe's spec
        refuses are sent as declared bad requests)."""
        token = await new_session_token(client)
        declared = stripe_spec.expect_invalid_requests() if spec_refuses else nullcontext()
        with declared:
            reply = await _raw_stream(running, token, body)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_fields")
        assert mentions in error["message"]
        assert standin.meter_events() == []

    async def test_duplicate_identifiers_silently_dropped(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A repeated identifier (same call or later) is not counted again and is no error;
        after 24 hours it counts anew."""
        token = await new_session_token(client)
        twice = [v2_event(scenario, "5", identifier="dup")] * 2
        await stream_events(client, token, twice)
        await stream_events(client, token, [v2_event(scenario, "5", identifier="dup")])
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0
        assert standin.async_errors == []
        standin.clock.advance(DAY + 1)
        token = await new_session_token(client)
        await stream_events(client, token, [v2_event(scenario, "5", identifier="dup")])
        assert standin.meter_total(scenario.customer, scenario.event_name) == 10.0

    async def test_shares_identifiers_with_v1(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """v1 and v2 events share one store: a v1 identifier dedupes a streamed one, and a v1
        cancellation cancels a streamed event."""
        await client.v1.billing.meter_events.create_async(
            {
                "event_name": scenario.event_name,
                "payload": {"stripe_customer_id": scenario.customer, "value": "4"},
                "identifier": "both",
            }
        )
        token = await new_session_token(client)
        events = [
            v2_event(scenario, "4", identifier="both"),
            v2_event(scenario, "6", identifier="s"),
        ]
        await stream_events(client, token, events)
        assert standin.meter_total(scenario.customer, scenario.event_name) == 10.0
        await client.v1.billing.meter_event_adjustments.create_async(
            {"event_name": scenario.event_name, "type": "cancel", "cancel": {"identifier": "s"}}
        )
        assert standin.meter_total(scenario.customer, scenario.event_name) == 4.0

    async def test_timestamps_and_summaries(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """ISO timestamps (any offset) place events in time; summaries include them."""
        token = await new_session_token(client)
        await stream_events(
            client,
            token,
            [
                v2_event(scenario, "3", timestamp="2025-01-15T11:00:00.000Z"),
                v2_event(scenario, "4", timestamp=_iso(START - 60)),
                v2_event(scenario, "5"),
            ],
        )
        events = standin.meter_events(customer=scenario.customer)
        assert [e["timestamp"] for e in events][:2] == [START - 3600, START - 60]
        assert abs(events[2]["timestamp"] - START) < 5
        summaries = await client.v1.billing.meters.event_summaries.list_async(
            scenario.meter,
            {"customer": scenario.customer, "start_time": START - 7200, "end_time": START},
        )
        assert [s["aggregated_value"] for s in summaries.data] == [7.0]

    async def test_async_errors(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """Invalid events are accepted (200), not counted, and recorded with Stripe's codes."""
        token = await new_session_token(client)
        no_customer = v2_event(scenario, "1", identifier="no-customer")
        del no_customer["payload"]["stripe_customer_id"]
        await stream_events(
            client,
            token,
            [
                v2_event(scenario, "1", identifier="no-meter", event_name="nobody_listens"),
                no_customer,
                v2_event(scenario, "1", identifier="stranger", customer="cus_nobody"),
                v2_event(scenario, "1.5", identifier="fraction"),
                v2_event(scenario, "1234567890123456", identifier="long"),
                v2_event(scenario, "1", identifier="old", timestamp=_iso(START - 36 * DAY)),
                v2_event(scenario, "1", identifier="future", timestamp=_iso(START + 600)),
                v2_event(scenario, "7", identifier="fine"),
            ],
        )
        assert standin.meter_total(scenario.customer, scenario.event_name) == 7.0
        codes = {e["identifier"]: e["code"] for e in standin.async_errors}
        assert codes == {
            "no-meter": "no_meter",
            "no-customer": "meter_event_no_customer_defined",
            "stranger": "meter_event_customer_not_found",
            "fraction": "meter_event_invalid_value",
            "long": "meter_event_value_too_many_digits",
            "old": "timestamp_too_far_in_past",
            "future": "timestamp_in_future",
        }
        meters = {e["identifier"]: e["meter"] for e in standin.async_errors}
        assert meters["no-meter"] is None
        assert meters["stranger"] == scenario.meter
        refused = [e for e in standin.meter_events() if not e["counted"]]
        assert len(refused) == 7


def _seed_failing_only_the_first_call() -> int:
    """A seed for which a rate-0.5 ``timeout`` injector fails the first stream call only."""
    for seed in range(1000):
        injector = FaultInjector()
        injector.configure(rate=0.5, kinds=["timeout"], paths=[STREAM], seed=seed)
        if injector.draw(STREAM) == "timeout" and injector.draw(STREAM) is None:
            return seed
    raise AssertionError("no such seed below 1000")


class TestFaults:
    """FaultInjector paths and refusal rules apply to ``/v2`` as to ``/v1``."""

    async def test_rejecting_faults(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A 500 on ``/v2/`` is ``APIError``, a 429 ``RateLimitError``; nothing is counted."""
        token = await new_session_token(client)
        standin.faults.configure(rate=1.0, kinds=["500"], paths=["/v2/"])
        with pytest.raises(stripe.APIError):
            await stream_events(client, token, [v2_event(scenario, "1")])
        with pytest.raises(stripe.APIError):
            await new_session_token(client)
        standin.faults.configure(rate=1.0, kinds=["429"], paths=[STREAM])
        with pytest.raises(stripe.RateLimitError):
            await stream_events(client, token, [v2_event(scenario, "1")])
        assert standin.faults.injected == {"500": 2, "429": 1}
        assert standin.meter_events() == []
        assert [e.fault for e in standin.requests[-3:]] == ["500", "500", "429"]

    async def test_v1_default_leaves_v2_alone(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """The default fault paths (``/v1/``) do not touch the stream."""
        token = await new_session_token(client)
        standin.faults.configure(rate=1.0, kinds=["500"])
        await stream_events(client, token, [v2_event(scenario, "1")])
        assert standin.meter_total(scenario.customer, scenario.event_name) == 1.0

    async def test_timeout_then_sdk_retry_counts_once(
        self, running: RunningStandin, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A held-back stream reply makes the SDK retry with the same key: a replay, counted once."""
        seed = _seed_failing_only_the_first_call()
        http_client = stripe.HTTPXClient(timeout=0.3)
        client = stripe.StripeClient(
            API_KEY,
            base_addresses={"api": running.url, "meter_events": running.url},
            http_client=http_client,
            max_network_retries=1,
            stripe_version=ACACIA,
        )
        try:
            token = await new_session_token(client)
            standin.faults.configure(rate=0.5, kinds=["timeout"], paths=[STREAM], seed=seed)
            await stream_events(client, token, [v2_event(scenario, "5", identifier="once")])
        finally:
            await http_client.close_async()  # type: ignore[no-untyped-call]
        attempts = [e for e in standin.requests if e.path == STREAM]
        assert [(e.fault, e.replayed) for e in attempts] == [("timeout", False), (None, True)]
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0

    async def test_refusal_rule_on_the_stream(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """Refusal rules match flattened JSON parameters of v2 calls."""
        token = await new_session_token(client)
        standin.faults.refuse(
            path=STREAM, where={"events[0][identifier]": "poison"}, status=400, code="nope"
        )
        with pytest.raises(stripe.InvalidRequestError):
            await stream_events(client, token, [v2_event(scenario, "1", identifier="poison")])
        await stream_events(client, token, [v2_event(scenario, "1", identifier="fine")])
        assert standin.meter_total(scenario.customer, scenario.event_name) == 1.0
