"""Billing correctness (issue 13): every unit on the right legs, customer and period, across caller
retries, stage changes, crashes and clocks that disagree.

Each test is named after the case it covers. Totals are read back from the stand-in's Stripe
summary endpoints (usage record summaries, meter event summaries) per customer and leg, never
from dualwrite's own ledger.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import RecordOutcome, Stage
from dualwrite.stripe_io import StripeClock
from dualwrite.testing import StripeStandin
from tests.conftest import SettingsFactory
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, set_stage, summary_totals

pytestmark = pytest.mark.anyio

USAGE_ROUTE = {
    "method": "POST",
    "path": "/usage/{customer}",
    "customer": "path:customer",
    "subscription_item": "json:item",
    "quantity": "json:quantity",
    "timestamp": "json:timestamp",
    "action": "json:action",
    "event_name": f"const:{EVENT_NAME}",
}


def usage_app() -> Starlette:
    """The user's app behind the middleware: it answers what was recorded."""

    async def recorded(request: Request) -> JSONResponse:
        outcome: RecordOutcome = request.state.dualwrite
        return JSONResponse({"stage": outcome.stage.value, "timestamp": outcome.event.timestamp})

    return Starlette(routes=[Route("/usage/{customer}", recorded, methods=["POST"])])


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """The test's settings, with the usage route."""
    return standin_settings(routes=(USAGE_ROUTE,))


def skewed(seconds: float) -> Callable[[], float]:
    """A host clock ``seconds`` ahead of (negative: behind) the real one, which Stripe's follows."""
    return lambda: time.time() + seconds


class App:
    """The middleware over the user's app, driven in-process; its engine delivers on demand."""

    def __init__(self, engine: DualWriteEngine, clock: Callable[[], float] = time.time):
        self.engine = engine
        middleware = DualWriteMiddleware(usage_app(), engine=engine, clock=clock)
        transport = httpx.ASGITransport(app=middleware)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://app")

    async def usage(self, scenario: Scenario, quantity: int, **fields: Any) -> httpx.Response:
        """POST one usage request for the scenario's customer and item."""
        body = {"item": scenario.item, "quantity": quantity, **fields}
        return await self.client.post(f"/usage/{scenario.customer}", json=body)

    async def deliver(self) -> None:
        """Deliver every shadow write now."""
        worker = self.engine.new_worker()
        await worker.start()
        with anyio.fail_after(30):
            await worker.drain()
        await worker.aclose()


@pytest.fixture
async def app_with_clock(
    settings: Settings,
) -> AsyncIterator[Callable[[Callable[[], float]], App]]:
    """Makes the app on an engine whose host clock is the one given."""
    engines: list[DualWriteEngine] = []
    clients: list[httpx.AsyncClient] = []

    def make(clock: Callable[[], float]) -> App:
        engine = DualWriteEngine.from_settings(settings, clock=clock)
        engines.append(engine)
        app = App(engine, clock)
        clients.append(app.client)
        return app

    yield make
    for client in clients:
        await client.aclose()
    for engine in engines:
        await engine.aclose()


class TestStripeClock:
    """Case 4: a host clock ahead of Stripe's never gets usage refused as 'in the future'."""

    @pytest.mark.parametrize("skew", [2.0, -2.0])
    @pytest.mark.parametrize("stage", [Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY])
    async def test_clock_skew_never_stamps_usage_after_stripes_now(
        self, skew, stage, app_with_clock, builder: ScenarioBuilder, standin: StripeStandin
    ):
        """With the host clock 2 s ahead of (or behind) Stripe's, usage without a timestamp is
        written at every stage, both legs at one instant no later than Stripe's clock, and no
        shadow write is dead-lettered."""
        app = app_with_clock(skewed(skew))
        scenario = await builder.customer()
        await app.engine.start(worker=False)
        await set_stage(app.engine, scenario.customer, stage)
        for quantity in (3, 4, 5):
            response = await app.usage(scenario, quantity)
            assert response.status_code == 200, response.text
            assert response.json()["timestamp"] <= standin.clock.now()
        await app.deliver()
        legacy, meter = await summary_totals(builder.client, scenario)
        assert legacy == 12
        assert meter == (0 if stage is Stage.LEGACY else 12)
        assert (await app.engine.outbox.depth()).dead == 0
        if stage is not Stage.LEGACY:
            legacy_at = sorted(r["timestamp"] for r in standin.usage_records(scenario.item))
            meter_at = sorted(e["timestamp"] for e in standin.meter_events(scenario.customer))
            assert legacy_at == meter_at

    async def test_clock_estimate_never_ahead_and_follows_a_step_back(self):
        """The estimate is the largest lower bound of recent replies: Stripe's Date, plus the
        local time since; a clock stepped back is followed once the window has passed."""
        local = [1_000.0]
        clock = StripeClock(local=lambda: local[0], window=0.05)
        assert not clock.known and clock.now() == 1_000
        clock.observe(formatdate(990, usegmt=True))  # Stripe is (at least) 10 s behind us
        local[0] = 1_003.5
        assert clock.now() == 993
        clock.observe(formatdate(994, usegmt=True))  # a later reply: at least 9.5 s behind
        assert clock.now() == 994
        clock.observe("not a date")
        assert clock.now() == 994
        clock.observe(formatdate(983, usegmt=True))  # Stripe's clock was stepped back
        assert clock.now() == 994  # within the window the larger bound holds
        await anyio.sleep(0.1)
        assert clock.now() == 983
