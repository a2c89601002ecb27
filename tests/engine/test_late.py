"""Late refusals: Stripe's signed error-report events mark meter events it accepted, then refused."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.metrics import REGISTRY
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import Stage
from dualwrite.testing import StripeStandin, serve_app
from stripe_standin._notifications import signature_header
from stripe_standin._objects import render_thin_event
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, make_settings, set_stage, usage

pytestmark = pytest.mark.anyio

SECRET = "whsec_dualwriteTestsSigningSecret0001"
EVENTS_PATH = "/_dualwrite/stripe/events"


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str) -> Settings:
    """Settings with the event destination's signing secret."""
    return make_settings(
        redis_url=redis_url, prefix=key_prefix, api_base=standin_url, api_key=STRIPE_KEY
    ).model_copy(update={"stripe_webhook_secret": SecretStr(SECRET)})


@pytest.fixture
def receiver(settings: Settings, standin: StripeStandin) -> Iterator[str]:
    """An app behind the middleware, served for real, registered as the stand-in's destination."""
    app = DualWriteMiddleware(Starlette(), config=settings)
    with serve_app(app, lifespan=True) as url:  # the app's engine lives and dies in its loop
        standin.add_event_destination(url + EVENTS_PATH, SECRET)
        yield url


@pytest.fixture
async def shadow(engine: DualWriteEngine, standin_url: str) -> Scenario:
    """A shadow customer with three meter events delivered: 2, 5 and 7."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    scenario = await builder.customer()
    await builder.aclose()
    await set_stage(engine, scenario.customer, Stage.SHADOW)
    for index, quantity in enumerate((2, 5, 7)):
        await engine.record(usage(scenario, quantity, identifier=f"late-{index}"))
    with anyio.fail_after(10):
        await engine.new_worker().drain()
    return scenario


async def meter_row(engine: DualWriteEngine, customer: str) -> dict[str, int]:
    """Meter-leg counters of one customer."""
    names = ("meter_accepted_qty", "meter_late_refused_qty", "divergent_events")
    totals = dict.fromkeys(names, 0)
    for row in await engine.ledger.rows(customer=customer):
        for name in names:
            totals[name] += row[name]
    return totals


class TestErrorReports:
    """A pushed error report marks the sampled events as refused late, once."""

    async def test_refused_event_is_marked(self, engine, shadow, receiver, standin):
        """The refused event leaves the meter's accepted total and becomes divergence."""
        refused = usage(shadow, 5, identifier="late-1").meter_identifier
        standin.refuse_later(refused, code="meter_event_customer_not_found", message="gone")
        [event] = await anyio.to_thread.run_sync(standin.report_meter_errors)
        assert [d["status"] for d in standin.event_deliveries] == [200]
        assert await meter_row(engine, shadow.customer) == {
            "meter_accepted_qty": 9,
            "meter_late_refused_qty": 5,
            "divergent_events": 1,
        }
        assert (
            standin.meter_total(shadow.customer, EVENT_NAME) == 9
        )  # the ledger agrees with Stripe
        [record] = await engine.ledger.divergences(customer=shadow.customer)
        assert record.kind == "late_refusal" and record.meter.stripe_id == refused
        assert "meter_event_customer_not_found" in (record.meter.error or "")
        assert event["type"] == "v1.billing.meter.error_report_triggered"

    async def test_a_report_delivered_twice_marks_once(
        self, engine, shadow, receiver, standin, settings
    ):
        """Posting the same signed event again changes nothing."""
        standin.refuse_later(usage(shadow, 7, identifier="late-2").meter_identifier)
        [event] = await anyio.to_thread.run_sync(standin.report_meter_errors)
        payload = json.dumps(render_thin_event(event))
        result = await engine.late.handle(
            payload.encode(), signature_header(payload, SECRET, int(time.time()))
        )
        assert (result.marked, result.repeated) == (0, 1)
        assert (await meter_row(engine, shadow.customer))["meter_late_refused_qty"] == 7

    async def test_late_refusal_counts_as_divergence(self, engine, shadow, receiver, standin):
        """Each newly marked sample adds one to dualwrite_divergences_total{kind="late_refusal"};
        the same report delivered again adds nothing."""

        def counted() -> float:
            labels = {"kind": "late_refusal"}
            return REGISTRY.get_sample_value("dualwrite_divergences_total", labels) or 0.0

        before = counted()
        for identifier in ("late-0", "late-2"):
            standin.refuse_later(usage(shadow, 1, identifier=identifier).meter_identifier)
        [event] = await anyio.to_thread.run_sync(standin.report_meter_errors)
        assert counted() - before == 2
        payload = json.dumps(render_thin_event(event))
        result = await engine.late.handle(
            payload.encode(), signature_header(payload, SECRET, int(time.time()))
        )
        assert result.repeated == 2 and counted() - before == 2

    async def test_bad_signature_is_refused(self, receiver, engine, shadow):
        """A forged event gets 400 and marks nothing."""
        async with httpx.AsyncClient(base_url=receiver) as http:
            response = await http.post(
                EVENTS_PATH, content=b'{"id": "evt_x"}', headers={"Stripe-Signature": "t=1,v1=00"}
            )
        assert (
            response.status_code == 400 and "does not verify" in response.json()["error"]["message"]
        )
        assert (await meter_row(engine, shadow.customer))["divergent_events"] == 0

    async def test_missing_signature_is_refused(self, receiver, engine, shadow):
        """An event with no Stripe-Signature header at all gets 400 too."""
        async with httpx.AsyncClient(base_url=receiver) as http:
            response = await http.post(EVENTS_PATH, content=b'{"id": "evt_x"}')
        assert (
            response.status_code == 400 and "does not verify" in response.json()["error"]["message"]
        )
        assert (await meter_row(engine, shadow.customer))["divergent_events"] == 0
