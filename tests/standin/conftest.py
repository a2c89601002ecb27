"""Fixtures for the stand-in's own tests: a served stand-in, SDK and raw HTTP clients, a scenario."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import stripe

from stripe_standin import RunningStandin, StripeStandin, serve_standin
from tests.standin.standin_support import ACACIA, API_KEY, START, Scenario, make_scenario


@pytest.fixture
def standin() -> StripeStandin:
    """A fresh stand-in whose clock starts at ``START``."""
    return StripeStandin(start_time=START, seed=7)


@pytest.fixture(scope="session")
def _server() -> Iterator[RunningStandin]:
    """One real server (a free port) for the session; each test swaps its own stand-in in."""
    with serve_standin(StripeStandin()) as served:
        yield served


@pytest.fixture
def running(_server: RunningStandin, standin: StripeStandin) -> Iterator[RunningStandin]:
    """This test's stand-in, served over a real socket."""
    _server.swap(standin)
    yield _server
    _server.swap(StripeStandin())


@pytest.fixture
async def client(running: RunningStandin) -> AsyncIterator[stripe.StripeClient]:
    """The official SDK pointed at the stand-in (pinned to a pre-basil version, no retries)."""
    http_client = stripe.HTTPXClient()
    yield stripe.StripeClient(
        API_KEY,
        base_addresses={"api": running.url, "meter_events": running.url},
        http_client=http_client,
        max_network_retries=0,
        stripe_version=ACACIA,
    )
    await http_client.close_async()  # type: ignore[no-untyped-call]


@pytest.fixture
async def http(running: RunningStandin) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client on the stand-in, authenticated, for wire-level checks."""
    async with httpx.AsyncClient(
        base_url=running.url,
        headers={"Authorization": f"Bearer {API_KEY}", "Stripe-Version": ACACIA},
        timeout=5.0,
    ) as raw:
        yield raw


@pytest.fixture
async def scenario(client: stripe.StripeClient) -> Scenario:
    """A customer on a legacy metered item, with a meter ready for the shadow writes."""
    return await make_scenario(client)
