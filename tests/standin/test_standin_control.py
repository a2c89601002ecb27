"""The ``/_standin/`` control endpoints, the request log, the clock and the public exports."""

from __future__ import annotations

import anyio
import httpx
import pytest
import stripe

import stripe_standin
from stripe_standin import RunningStandin, StandinClock, StandinError, StripeStandin, serve_standin
from tests.standin.standin_support import SDK_WARNING, START, Scenario, usage_record

pytestmark = [pytest.mark.anyio, SDK_WARNING]


class TestControlEndpoints:
    """JSON controls under ``/_standin/``, no API key needed."""

    async def test_state(
        self,
        running: RunningStandin,
        scenario: Scenario,
        http: httpx.AsyncClient,
        client: stripe.StripeClient,
        standin: StripeStandin,
    ) -> None:
        """The state shows the clock, counts and totals on both paths."""
        standin.clock.advance(60)
        await usage_record(client, scenario.item, 4, timestamp=START + 1)
        await http.post(
            "/v1/billing/meter_events",
            data={
                "event_name": scenario.event_name,
                "payload[stripe_customer_id]": scenario.customer,
                "payload[value]": "4",
            },
        )
        async with httpx.AsyncClient(base_url=running.url) as anonymous:
            state = (await anonymous.get("/_standin/state")).json()
        assert state["clock"] >= START + 60
        assert state["counts"]["customers"] == 1
        assert state["counts"]["usage_records"] == 1
        assert state["meter_totals"] == {scenario.customer: {scenario.event_name: 4.0}}
        assert state["legacy_totals"] == {scenario.item: 4}

    async def test_clock_advance_and_set(
        self, running: RunningStandin, standin: StripeStandin
    ) -> None:
        """The clock moves forward or to a given time; bad bodies are a 400."""
        async with httpx.AsyncClient(base_url=running.url) as raw:
            moved = await raw.post("/_standin/clock/advance", json={"seconds": 3600})
            assert moved.json()["clock"] >= START + 3600
            assert (
                await raw.post("/_standin/clock/set", json={"timestamp": START})
            ).status_code == 200
            assert standin.clock.now() - START < 5
            assert (
                await raw.post("/_standin/clock/advance", json={"seconds": -1})
            ).status_code == 400
            assert (await raw.post("/_standin/clock/advance", content=b"[1]")).status_code == 400
            assert (
                await raw.post("/_standin/clock/advance", json={"seconds": "x"})
            ).status_code == 400

    async def test_faults(self, running: RunningStandin, standin: StripeStandin) -> None:
        """Faults are configured and cleared over HTTP with ``configure``'s options."""
        async with httpx.AsyncClient(base_url=running.url) as raw:
            set_up = await raw.post(
                "/_standin/faults", json={"rate": 1.0, "kinds": ["500"], "seed": 3}
            )
            assert set_up.json()["faults"]["rate"] == 1.0
            api = await raw.get(
                "/v1/customers", headers={"Authorization": "Bearer sk_test_0123456789ab"}
            )
            assert api.status_code == 500
            assert (await raw.post("/_standin/faults", json={"rate": 2})).status_code == 400
            assert (await raw.post("/_standin/faults", json={"rat": 1})).status_code == 400
            assert (await raw.post("/_standin/faults", json={})).status_code == 400
            cleared = await raw.post("/_standin/faults/clear")
            assert cleared.json()["faults"]["rate"] == 0.0
        assert standin.faults.injected == {"500": 1}

    async def test_request_log(self, http: httpx.AsyncClient, standin: StripeStandin) -> None:
        """Every API call is logged with its parameters and status; reset empties the log."""
        await http.post(
            "/v1/customers",
            data={"name": "A", "metadata[tier]": "gold"},
            headers={"Idempotency-Key": "log-1"},
        )
        (entry,) = standin.requests
        assert (entry.method, entry.path, entry.status) == ("POST", "/v1/customers", 200)
        assert entry.params == {"name": "A", "metadata": {"tier": "gold"}}
        assert entry.flat_params == {"name": "A", "metadata[tier]": "gold"}
        assert entry.idempotency_key == "log-1"
        assert entry.stripe_version == "2025-02-24.acacia"
        assert entry.executed is True
        await http.post("/_standin/requests/reset")
        assert standin.requests == []
        standin.reset_requests()


class TestClock:
    """The stand-in's clock (its calendar: ``test_calendar.py``)."""

    def test_clock_ticks_from_its_start(self) -> None:
        """The clock starts where asked and moves forward."""
        clock = StandinClock(START)
        assert 0 <= clock.now() - START < 5
        assert clock.advance(100) >= START + 100
        clock.set(10)
        assert clock.now() < 15
        with pytest.raises(StandinError):
            clock.advance(-1)


class TestPublicApi:
    """The package's exports and constructor checks."""

    def test_all_is_sorted_and_complete(self) -> None:
        """``__all__`` is sorted and every name in it exists."""
        names = stripe_standin.__all__
        assert names == sorted(names)
        assert all(hasattr(stripe_standin, name) for name in names)

    @pytest.mark.parametrize(
        "kwargs",
        [{"default_api_version": "latest"}, {"api_keys": "sk_test_x"}, {"latency_seconds": -1}],
    )
    def test_bad_settings(self, kwargs: dict[str, object]) -> None:
        """Misconfiguration raises ``StandinError``."""
        with pytest.raises(StandinError):
            StripeStandin(**kwargs)  # type: ignore[arg-type]

    def test_swap(self) -> None:
        """``swap`` puts another stand-in behind the running server."""
        first, second = StripeStandin(), StripeStandin(start_time=42)
        with serve_standin(first) as running:
            running.swap(second)
            assert running.standin is second
            assert httpx.get(f"{running.url}/_standin/state").json()["clock"] < 100

    async def test_latency(self, http: httpx.AsyncClient, standin: StripeStandin) -> None:
        """``latency_seconds`` delays every API reply."""
        standin.latency_seconds = 0.2
        started = anyio.current_time()
        await http.get("/v1/customers")
        assert anyio.current_time() - started >= 0.2

    def test_serving_twice(self) -> None:
        """One stand-in can be served again after its server stopped."""
        standin = StripeStandin()
        for _ in range(2):
            with serve_standin(standin) as running:
                assert running.url.startswith("http://127.0.0.1:")
                assert httpx.get(f"{running.url}/_standin/state").status_code == 200
