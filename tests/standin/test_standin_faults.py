"""Injected faults and refusal rules: what is executed, what is saved, what a retry gets."""

from __future__ import annotations

import httpx
import pytest
import stripe

from stripe_standin import FaultInjector, RunningStandin, StandinError, StripeStandin
from tests.standin.standin_support import ACACIA, API_KEY, SDK_WARNING, Scenario

pytestmark = [pytest.mark.anyio, SDK_WARNING]

EVENTS = "/v1/billing/meter_events"


def _event_form(scenario: Scenario, value: str = "5", identifier: str = "ev-1") -> dict[str, str]:
    return {
        "event_name": scenario.event_name,
        "payload[stripe_customer_id]": scenario.customer,
        "payload[value]": value,
        "identifier": identifier,
    }


def _seed_failing_only_the_first_call() -> int:
    """A seed for which a rate-0.5 ``timeout`` injector fails the first call but not the second."""
    for seed in range(1000):
        injector = FaultInjector()
        injector.configure(rate=0.5, kinds=["timeout"], seed=seed)
        if injector.draw(EVENTS) == "timeout" and injector.draw(EVENTS) is None:
            return seed
    raise AssertionError("no such seed below 1000")


class TestRejectingFaults:
    """500, 503, 429 and 409 faults: nothing executed, nothing saved under the key."""

    @pytest.mark.parametrize(
        ("kind", "status", "error_type", "code"),
        [
            ("500", 500, "api_error", None),
            ("503", 503, "api_error", None),
            ("429", 429, "invalid_request_error", "rate_limit"),
            ("409", 409, "invalid_request_error", "lock_timeout"),
        ],
    )
    async def test_not_executed_and_retry_runs(
        self,
        http: httpx.AsyncClient,
        scenario: Scenario,
        standin: StripeStandin,
        kind: str,
        status: int,
        error_type: str,
        code: str | None,
    ) -> None:
        """The fault is returned, the event is not recorded, and a retry with the key executes."""
        standin.faults.configure(rate=1.0, kinds=[kind])
        headers = {"Idempotency-Key": f"fault-{kind}"}
        reply = await http.post(EVENTS, data=_event_form(scenario), headers=headers)
        assert reply.status_code == status
        assert reply.json()["error"]["type"] == error_type
        assert reply.json()["error"].get("code") == code
        if kind == "429":
            assert reply.headers["Stripe-Should-Retry"] == "true"
        assert standin.meter_events() == []
        assert standin.faults.injected == {kind: 1}
        standin.faults.clear()
        retry = await http.post(EVENTS, data=_event_form(scenario), headers=headers)
        assert retry.status_code == 200
        assert "Idempotent-Replayed" not in retry.headers
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0

    async def test_sdk_sees_rate_limit(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """stripe-python raises ``RateLimitError`` for an injected 429."""
        standin.faults.configure(rate=1.0, kinds=["429"])
        with pytest.raises(stripe.RateLimitError):
            await client.v1.customers.list_async()

    async def test_paths_limit_the_faults(
        self, http: httpx.AsyncClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """Only calls under the configured path prefixes fail."""
        standin.faults.configure(rate=1.0, kinds=["500"], paths=[EVENTS])
        assert (await http.get(f"/v1/customers/{scenario.customer}")).status_code == 200
        assert (await http.post(EVENTS, data=_event_form(scenario))).status_code == 500

    async def test_rate_is_deterministic_per_seed(self) -> None:
        """Two injectors with the same seed fail the same calls with the same kinds."""
        draws = []
        for _ in range(2):
            injector = FaultInjector()
            injector.configure(rate=0.3, kinds=["500", "429", "timeout"], seed=42)
            draws.append([injector.draw("/v1/x") for _ in range(200)])
        assert draws[0] == draws[1]
        assert 30 < sum(d is not None for d in draws[0]) < 90

    @pytest.mark.parametrize(
        "options",
        [
            {"rate": 1.5},
            {"rate": 0.5, "kinds": ["418"]},
            {"rate": 0.5, "kinds": []},
            {"rate": 0.5, "paths": "/v1/"},
            {"rate": 0.5, "timeout_seconds": -1},
        ],
    )
    def test_misconfiguration(self, options: dict[str, object]) -> None:
        """Bad settings raise ``StandinError`` instead of silently doing nothing."""
        with pytest.raises(StandinError):
            FaultInjector().configure(**options)  # type: ignore[arg-type]


class TestTimeoutFault:
    """The ``timeout`` kind: executed and saved, reply held back; a retry gets the saved reply."""

    async def test_executed_once_and_replayed(
        self, running: RunningStandin, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """The client times out, the event counts once, and the retry is a replay."""
        standin.faults.configure(rate=1.0, kinds=["timeout"], timeout_seconds=30)
        headers = {
            "Authorization": f"Bearer {API_KEY}",
            "Stripe-Version": ACACIA,
            "Idempotency-Key": "slow-1",
        }
        async with httpx.AsyncClient(base_url=running.url, headers=headers, timeout=0.3) as raw:
            with pytest.raises(httpx.ReadTimeout):
                await raw.post(EVENTS, data=_event_form(scenario))
            assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0
            standin.faults.clear()
            retry = await raw.post(EVENTS, data=_event_form(scenario))
        assert retry.status_code == 200
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json()["identifier"] == "ev-1"
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0
        assert len(standin.meter_events()) == 1
        assert [e.executed for e in standin.requests if e.path == EVENTS] == [True, False]

    async def test_sdk_retry_is_exactly_once(
        self, running: RunningStandin, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """stripe-python's own retry (same Idempotency-Key) after a timeout counts the event once."""
        seed = _seed_failing_only_the_first_call()
        standin.faults.configure(rate=0.5, kinds=["timeout"], paths=[EVENTS], seed=seed)
        http_client = stripe.HTTPXClient(timeout=0.3)
        client = stripe.StripeClient(
            API_KEY,
            base_addresses={"api": running.url},
            http_client=http_client,
            max_network_retries=1,
            stripe_version=ACACIA,
        )
        try:
            event = await client.v1.billing.meter_events.create_async(
                {
                    "event_name": scenario.event_name,
                    "payload": {"stripe_customer_id": scenario.customer, "value": "5"},
                    "identifier": "sdk-retry",
                }
            )
        finally:
            await http_client.close_async()  # type: ignore[no-untyped-call]
        assert event["identifier"] == "sdk-retry"
        attempts = [e for e in standin.requests if e.path == EVENTS]
        assert [(e.fault, e.replayed) for e in attempts] == [("timeout", False), (None, True)]
        assert attempts[0].idempotency_key == attempts[1].idempotency_key
        assert standin.meter_total(scenario.customer, scenario.event_name) == 5.0


class TestRefusalRules:
    """Permanent refusals matched on path and flattened parameters."""

    async def test_refusal_with_count(
        self, http: httpx.AsyncClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """A rule refuses its matches ``count`` times, leaves others alone, and saves nothing."""
        standin.faults.refuse(
            path=r"/v1/billing/meter_events",
            where={"payload[stripe_customer_id]": scenario.customer, "payload[value]": "13"},
            status=402,
            code="card_declined",
            message="No.",
            count=2,
        )
        headers = {"Idempotency-Key": "r-1"}
        for _ in range(2):
            refused = await http.post(
                EVENTS, data=_event_form(scenario, "13", "x"), headers=headers
            )
            assert refused.status_code == 402
            assert refused.json()["error"] == {
                "type": "invalid_request_error",
                "code": "card_declined",
                "doc_url": "https://stripe.com/docs/error-codes/card-declined",
                "message": "No.",
            }
        other = await http.post(EVENTS, data=_event_form(scenario, "12", "y"))
        assert other.status_code == 200
        third = await http.post(EVENTS, data=_event_form(scenario, "13", "x"), headers=headers)
        assert third.status_code == 200
        assert "Idempotent-Replayed" not in third.headers
        assert standin.faults.injected == {"refused": 2}
        assert standin.meter_total(scenario.customer, scenario.event_name) == 25.0

    async def test_path_regex_fullmatch(
        self, http: httpx.AsyncClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """The path is a regular expression matched against the whole path."""
        standin.faults.refuse(path=r"/v1/subscription_items/si_\w+/usage_records")
        reply = await http.post(
            f"/v1/subscription_items/{scenario.item}/usage_records", data={"quantity": "1"}
        )
        assert reply.status_code == 400
        assert (await http.get(f"/v1/subscription_items/{scenario.item}")).status_code == 200

    def test_bad_rules(self) -> None:
        """An invalid regex or status is a set-up error."""
        with pytest.raises(StandinError):
            FaultInjector().refuse(path="(")
        with pytest.raises(StandinError):
            FaultInjector().refuse(path="/v1/x", status=200)
