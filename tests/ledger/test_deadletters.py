"""Dead letters: found, shown, retried into the outbox (ledger made whole again), dropped."""

from __future__ import annotations

import anyio
import pytest

from dualwrite.deadletters import DeadLetterNotFoundError, DeadLetters
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, set_stage, usage

pytestmark = pytest.mark.anyio


@pytest.fixture
async def refused(engine: DualWriteEngine, standin_url: str, standin: StripeStandin) -> Scenario:
    """A shadow customer whose two meter events were refused for good (two dead letters)."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    scenario = await builder.customer()
    await builder.aclose()
    await set_stage(engine, scenario.customer, Stage.SHADOW)
    standin.faults.refuse(
        path=r"/v1/billing/meter_events",
        status=400,
        code="parameter_invalid",
        message="no",
        count=2,
    )
    await engine.record(usage(scenario, 3))
    await engine.record(usage(scenario, 4))
    with anyio.fail_after(10):
        await engine.new_worker().drain()
    return scenario


async def meter_counters(engine: DualWriteEngine, customer: str) -> dict[str, int]:
    """The meter-side ledger counters of one customer."""
    names = ("meter_accepted_qty", "meter_failed_qty", "divergent_events", "meter_expected_qty")
    totals = dict.fromkeys(names, 0)
    for row in await engine.ledger.rows(customer=customer):
        for name in names:
            totals[name] += row[name]
    return totals


class TestDeadLetters:
    """The dead-letter commands' library side."""

    async def test_find_and_show(self, engine, refused):
        """Both refusals are listed, newest first, with Stripe's error and the entry."""
        letters = DeadLetters(engine.redis, engine.keys)
        found = await letters.find()
        assert len(found) == 2 and all(letter.reason == "refused" for letter in found)
        assert "parameter_invalid" in found[0].error
        shown = await letters.show(found[0].id)
        assert shown.entry is not None and shown.entry.event.customer == refused.customer
        assert await letters.find(customer="cus_nobody") == []

    async def test_retry_delivers_and_restores_the_ledger(self, engine, refused, standin):
        """A retried letter is delivered once and no longer counts as failed or divergent."""
        letters = DeadLetters(engine.redis, engine.keys)
        before = await meter_counters(engine, refused.customer)
        assert before["meter_failed_qty"] == 7 and before["divergent_events"] == 2
        ids = [letter.id for letter in await letters.find()]
        preview = await letters.retry(ids, dry_run=True)
        assert len(preview) == 2 and len(await letters.find()) == 2  # a dry run changes nothing
        await letters.retry(ids)
        with anyio.fail_after(10):
            await engine.new_worker().drain()
        after = await meter_counters(engine, refused.customer)
        assert after == {
            "meter_accepted_qty": 7,
            "meter_failed_qty": 0,
            "divergent_events": 0,
            "meter_expected_qty": 7,
        }
        assert standin.meter_total(refused.customer, EVENT_NAME) == 7
        assert await letters.find() == []

    async def test_drop_keeps_the_failure_counted(self, engine, refused):
        """A dropped letter is gone; the ledger still says the write failed."""
        letters = DeadLetters(engine.redis, engine.keys)
        [first, second] = await letters.find()
        await letters.drop([first.id], dry_run=True)
        assert len(await letters.find()) == 2
        await letters.drop([first.id])
        assert [letter.id for letter in await letters.find()] == [second.id]
        assert (await meter_counters(engine, refused.customer))["meter_failed_qty"] == 7

    async def test_unknown_ids_are_refused_clearly(self, engine, refused):
        """A malformed or unknown id names itself and says where ids come from."""
        letters = DeadLetters(engine.redis, engine.keys)
        with pytest.raises(DeadLetterNotFoundError, match="dead list"):
            await letters.show("nonsense")
        with pytest.raises(DeadLetterNotFoundError, match="0:1-1"):
            await letters.retry(["0:1-1"])
