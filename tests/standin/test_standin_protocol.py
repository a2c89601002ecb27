"""Stripe's protocol: authentication, headers, idempotency and unknown URLs, at the wire level."""

from __future__ import annotations

import base64

import anyio
import httpx
import pytest
import stripe

from stripe_standin import RunningStandin, SpecChecker, StripeStandin, serve_standin
from tests.standin.standin_support import ACACIA, API_KEY, SDK_WARNING, Scenario

pytestmark = [pytest.mark.anyio, SDK_WARNING]


class TestAuthentication:
    """API keys: Bearer or Basic, test keys only, and never echoed back."""

    async def test_missing_key(self, running: RunningStandin) -> None:
        """No key is a 401 telling how to send one."""
        async with httpx.AsyncClient(base_url=running.url) as raw:
            reply = await raw.get("/v1/customers")
        assert reply.status_code == 401
        assert reply.json()["error"]["message"].startswith("You did not provide an API key.")

    async def test_wrong_key_is_masked(self, running: RunningStandin) -> None:
        """A refused key shows only its prefix and last four characters."""
        key = "sk_live_supersecretvalue9876"
        async with httpx.AsyncClient(base_url=running.url) as raw:
            reply = await raw.get("/v1/customers", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 401
        assert reply.json()["error"]["message"] == "Invalid API Key provided: sk_live_****9876"
        assert "supersecret" not in reply.text

    async def test_short_key_is_fully_masked(self, running: RunningStandin) -> None:
        """A short wrong key is not partly revealed."""
        async with httpx.AsyncClient(base_url=running.url) as raw:
            reply = await raw.get("/v1/customers", headers={"Authorization": "Bearer hunter2"})
        assert reply.json()["error"]["message"] == "Invalid API Key provided: ****"

    async def test_sdk_raises_authentication_error(self, running: RunningStandin) -> None:
        """The SDK sees a 401 as ``AuthenticationError``."""
        http_client = stripe.HTTPXClient()
        client = stripe.StripeClient(
            "rk_live_nope0000000000000",
            base_addresses={"api": running.url},
            http_client=http_client,
            max_network_retries=0,
        )
        try:
            with pytest.raises(stripe.AuthenticationError):
                await client.v1.customers.list_async()
        finally:
            await http_client.close_async()  # type: ignore[no-untyped-call]

    async def test_basic_auth(self, running: RunningStandin) -> None:
        """HTTP Basic with the key as user name is accepted, as some SDKs send it."""
        token = base64.b64encode(f"{API_KEY}:".encode()).decode()
        async with httpx.AsyncClient(base_url=running.url) as raw:
            reply = await raw.get("/v1/customers", headers={"Authorization": f"Basic {token}"})
        assert reply.status_code == 200

    async def test_configured_keys_only(self) -> None:
        """With ``api_keys`` set, only those keys are accepted."""
        standin = StripeStandin(api_keys=["sk_test_only"])
        with serve_standin(standin) as running:
            async with httpx.AsyncClient(base_url=running.url) as raw:
                ok = await raw.get(
                    "/v1/customers", headers={"Authorization": "Bearer sk_test_only"}
                )
                other = await raw.get(
                    "/v1/customers", headers={"Authorization": f"Bearer {API_KEY}"}
                )
        assert (ok.status_code, other.status_code) == (200, 401)


class TestHeaders:
    """What every reply carries."""

    async def test_reply_headers(self, http: httpx.AsyncClient) -> None:
        """Request-Id, Stripe-Version and the echoed Idempotency-Key."""
        reply = await http.post("/v1/customers", headers={"Idempotency-Key": "hdr-1"})
        assert reply.headers["Request-Id"].startswith("req_")
        assert reply.headers["Stripe-Version"] == ACACIA
        assert reply.headers["Idempotency-Key"] == "hdr-1"

    async def test_bad_version(self, http: httpx.AsyncClient) -> None:
        """A malformed Stripe-Version is refused."""
        reply = await http.get("/v1/customers", headers={"Stripe-Version": "yesterday"})
        assert reply.status_code == 400

    async def test_unknown_url(self, http: httpx.AsyncClient) -> None:
        """An unknown path is Stripe's 404 naming the method and path."""
        reply = await http.post("/v1/charges_of_light")
        assert reply.status_code == 404
        assert reply.json()["error"]["message"].startswith(
            "Unrecognized request URL (POST: /v1/charges_of_light)."
        )

    async def test_unknown_v2_url(self, http: httpx.AsyncClient) -> None:
        """An unknown ``/v2`` path is a 404 in API v2's error shape (a code is always present)."""
        reply = await http.post("/v2/billing/meter_event_river", json={})
        assert reply.status_code == 404
        error = reply.json()["error"]
        assert error["message"].startswith("Unrecognized request URL (POST: /v2/billing/")
        assert error["code"] == "invalid_request_error"
        assert "param" not in error


class TestIdempotency:
    """Stripe's v1 idempotency rules."""

    async def test_replay(self, http: httpx.AsyncClient, standin: StripeStandin) -> None:
        """Same key, endpoint and parameters: the saved reply, marked as replayed."""
        first = await http.post(
            "/v1/customers", data={"name": "A"}, headers={"Idempotency-Key": "k"}
        )
        again = await http.post(
            "/v1/customers", data={"name": "A"}, headers={"Idempotency-Key": "k"}
        )
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Original-Request"] == first.headers["Request-Id"]
        assert "Idempotent-Replayed" not in first.headers
        assert standin.state()["counts"]["customers"] == 1
        assert [e.replayed for e in standin.requests] == [False, True]

    async def test_errors_are_replayed_too(self, http: httpx.AsyncClient) -> None:
        """An executed request that failed replays its failure (here a 404)."""
        path = "/v1/subscription_items/si_none/usage_records"
        headers = {"Idempotency-Key": "k404"}
        first = await http.post(path, data={"quantity": "1"}, headers=headers)
        again = await http.post(path, data={"quantity": "1"}, headers=headers)
        assert first.status_code == again.status_code == 404
        assert again.headers["Idempotent-Replayed"] == "true"

    async def test_validation_failures_are_not_saved(
        self, http: httpx.AsyncClient, stripe_spec: SpecChecker
    ) -> None:
        """A request refused before execution leaves its key free for a corrected retry."""
        headers = {"Idempotency-Key": "fixme"}
        with stripe_spec.expect_invalid_requests():
            bad = await http.post("/v1/customers", data={"nmae": "A"}, headers=headers)
            good = await http.post("/v1/customers", data={"nmae": "A"}, headers=headers)
        assert bad.status_code == good.status_code == 400
        assert "Idempotent-Replayed" not in good.headers

    async def test_other_parameters(self, http: httpx.AsyncClient) -> None:
        """Same key with other parameters: ``idempotency_error``."""
        await http.post("/v1/customers", data={"name": "A"}, headers={"Idempotency-Key": "k"})
        reply = await http.post(
            "/v1/customers", data={"name": "B"}, headers={"Idempotency-Key": "k"}
        )
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["type"] == "idempotency_error"
        assert error["message"].startswith(
            "Keys for idempotent requests can only be used with the same parameters"
        )

    async def test_other_endpoint(self, http: httpx.AsyncClient) -> None:
        """Same key on another endpoint: ``idempotency_error`` saying so."""
        await http.post("/v1/customers", data={"name": "A"}, headers={"Idempotency-Key": "k"})
        reply = await http.post(
            "/v1/products", data={"name": "A"}, headers={"Idempotency-Key": "k"}
        )
        assert reply.json()["error"]["type"] == "idempotency_error"
        assert "can only be used for the same endpoint" in reply.json()["error"]["message"]

    async def test_keys_are_per_api_key(self, http: httpx.AsyncClient) -> None:
        """Another API key has its own key space."""
        await http.post("/v1/customers", data={"name": "A"}, headers={"Idempotency-Key": "k"})
        reply = await http.post(
            "/v1/customers",
            data={"name": "B"},
            headers={"Idempotency-Key": "k", "Authorization": "Bearer sk_test_someone_else_1234"},
        )
        assert reply.status_code == 200

    async def test_key_in_use(self, http: httpx.AsyncClient, standin: StripeStandin) -> None:
        """While the first request still executes, the same key gets 409 ``idempotency_key_in_use``."""
        standin.latency_seconds = 0.3
        replies: list[httpx.Response] = []

        async def send() -> None:
            """Create the same customer under the same key."""
            replies.append(
                await http.post(
                    "/v1/customers", data={"name": "A"}, headers={"Idempotency-Key": "k"}
                )
            )

        async with anyio.create_task_group() as group:
            group.start_soon(send)
            await anyio.sleep(0.1)
            group.start_soon(send)
        assert sorted(r.status_code for r in replies) == [200, 409]
        conflict = next(r for r in replies if r.status_code == 409)
        assert conflict.json()["error"]["code"] == "idempotency_key_in_use"

    async def test_keys_expire_after_a_day(
        self, http: httpx.AsyncClient, standin: StripeStandin
    ) -> None:
        """After 24 hours the same key runs a new request."""
        await http.post("/v1/customers", data={"name": "A"}, headers={"Idempotency-Key": "k"})
        standin.clock.advance(86_401)
        reply = await http.post(
            "/v1/customers", data={"name": "B"}, headers={"Idempotency-Key": "k"}
        )
        assert reply.status_code == 200
        assert standin.state()["counts"]["customers"] == 2

    async def test_sdk_sends_and_reuses_keys(
        self, client: stripe.StripeClient, scenario: Scenario, standin: StripeStandin
    ) -> None:
        """The SDK's own Idempotency-Key on every POST reaches the stand-in."""
        await client.v1.billing.meter_events.create_async(
            {
                "event_name": scenario.event_name,
                "payload": {"stripe_customer_id": scenario.customer},
            },
            {"idempotency_key": "sdk-key"},
        )
        posted = [e for e in standin.requests if e.method == "POST"]
        assert all(e.idempotency_key for e in posted)
        assert posted[-1].idempotency_key == "sdk-key"
