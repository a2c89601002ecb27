"""`dualwrite dead …` against real Redis: list, show, retry (with --dry-run), drop, bad ids."""

from __future__ import annotations

import asyncio
import json

import anyio
import pytest
from typer.testing import CliRunner

from dualwrite.cli import app
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.testing import StripeStandin
from tests.conftest import STRIPE_KEY
from tests.support import ScenarioBuilder, make_settings, set_stage, usage


async def make_dead_letter(
    redis_url: str, prefix: str, standin_url: str, standin: StripeStandin
) -> str:
    """A shadow customer whose meter event Stripe refused for good; returns the customer."""
    settings = make_settings(
        redis_url=redis_url, prefix=prefix, api_base=standin_url, api_key=STRIPE_KEY
    )
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    scenario = await builder.customer()
    await builder.aclose()
    standin.faults.refuse(path=r"/v1/billing/meter_events", status=400, message="refused", count=1)
    async with DualWriteEngine.from_settings(settings) as engine:
        await set_stage(engine, scenario.customer, Stage.SHADOW)
        await engine.record(usage(scenario, 3))
        with anyio.fail_after(10):
            await engine.new_worker().drain()
    return scenario.customer


@pytest.fixture
def env(redis_url: str, key_prefix: str) -> dict[str, str]:
    """The CLI's environment: this test's Redis prefix."""
    return {
        "DUALWRITE_REDIS__URL": redis_url,
        "DUALWRITE_REDIS__KEY_PREFIX": key_prefix,
        "COLUMNS": "200",  # rich tables at full width, ids unwrapped
    }


@pytest.fixture
def customer(redis_url: str, key_prefix: str, standin_url: str, standin: StripeStandin) -> str:
    """A customer with one dead letter."""
    return asyncio.run(make_dead_letter(redis_url, key_prefix, standin_url, standin))


class TestDeadCommands:
    """The dead-letter commands."""

    def test_list_show_retry_drop(self, env, customer):
        """A dead letter is listed, shown, previewed, retried into the outbox; then none are left."""
        runner = CliRunner()
        listed = runner.invoke(app, ["dead", "list"], env=env)
        assert listed.exit_code == 0 and customer in listed.output and "refused" in listed.output
        [letter] = json.loads(runner.invoke(app, ["dead", "list", "--json"], env=env).output)
        dead_id = letter["id"]
        found = runner.invoke(app, ["dead", "list", "--customer", "cus_nobody"], env=env)
        assert "no dead letters" in found.output
        preview = runner.invoke(app, ["dead", "retry", "--all", "--dry-run"], env=env)
        assert preview.exit_code == 0 and "would retry 1 dead letter(s)" in preview.output
        assert customer in runner.invoke(app, ["dead", "list"], env=env).output
        shown = runner.invoke(app, ["dead", "show", dead_id], env=env)
        assert shown.exit_code == 0 and customer in shown.output
        retried = runner.invoke(app, ["dead", "retry", "--all"], env=env)
        assert retried.exit_code == 0 and "retried 1 dead letter(s)" in retried.output
        assert "no dead letters" in runner.invoke(app, ["dead", "list"], env=env).output

    def test_drop(self, env, customer):
        """drop --all removes the dead letters."""
        runner = CliRunner()
        dropped = runner.invoke(app, ["dead", "drop", "--all"], env=env)
        assert dropped.exit_code == 0 and "dropped 1 dead letter(s)" in dropped.output
        assert "no dead letters" in runner.invoke(app, ["dead", "list"], env=env).output

    def test_ids_or_all_required(self, env):
        """retry without ids or --all is refused with a message saying what to give."""
        result = CliRunner().invoke(app, ["dead", "retry"], env=env)
        assert result.exit_code != 0 and "--all" in result.output

    def test_unknown_id(self, env):
        """An id that is not a dead letter exits 2 and says where ids come from."""
        result = CliRunner().invoke(app, ["dead", "show", "nonsense"], env=env)
        assert result.exit_code == 2 and "dead list" in result.output
