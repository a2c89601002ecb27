"""Helpers shared by the test modules: settings for a test, a Stripe scenario built through the SDK,
stand-in faults, the operations audit, and the environment of a CLI run."""

from __future__ import annotations

import asyncio
import calendar
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import anyio
import pytest
import stripe
from pydantic import SecretStr
from stripe.params import SubscriptionCreateParams

from dualwrite.config import (
    DEFAULT_LEGACY_API_VERSION,
    MeterMapping,
    RedisSettings,
    Settings,
    UsageRoute,
)
from dualwrite.cutover import CutoverOps
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import ConflictError
from dualwrite.flags import RedisFlagStore
from dualwrite.keys import KeySpace
from dualwrite.migrate import OpsAudit, OpsAuditEntry
from dualwrite.models import RecordOutcome, Stage, UsageEvent
from dualwrite.redis_client import open_redis
from dualwrite.testing import StripeStandin, legacy_price_params, meter_params

LEGACY_VERSION = DEFAULT_LEGACY_API_VERSION
EVENT_NAME = "api_requests"
#: The key the stand-in accepts (``tests/conftest.py`` re-exports it).
STRIPE_KEY = "sk_test_dualwriteTests0000000000000001"


def make_settings(
    *,
    redis_url: str,
    prefix: str,
    api_base: str,
    api_key: str | None,
    routes: tuple[dict[str, Any], ...] = (),
    **sections: dict[str, Any],
) -> Settings:
    """Settings for one test: its own key prefix, the stand-in, fast retries."""
    outbox = {"backoff_base": 0.01, "backoff_max": 0.05, "block_ms": 20, "claim_idle_seconds": 0.2}
    outbox.update(sections.pop("outbox", {}))
    stripe_section = {"api_base": api_base, "timeout": 2.0}
    stripe_section.update(sections.pop("stripe", {}))
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": prefix, **sections.pop("redis", {})},
        "stripe": stripe_section,
        "outbox": outbox,
        "routes": tuple(UsageRoute.model_validate(route) for route in routes),
        "meters": (MeterMapping(event_name=EVENT_NAME),),
        "STRIPE_API_KEY": SecretStr(api_key) if api_key else None,
        **sections,
    }
    return Settings(**data)


def unreachable_redis_settings(prefix: str) -> Settings:
    """Settings whose Redis (with a password in its URL) never answers, quickly; no Stripe."""
    return make_settings(
        redis_url="redis://:s3cret@127.0.0.1:1/0",
        prefix=prefix,
        api_base="http://127.0.0.1:9",
        api_key=None,
        redis={"connect_timeout": 0.2, "socket_timeout": 0.2},
    )


def cli_environment(
    redis_url: str, key_prefix: str, standin_url: str, **extra: str
) -> dict[str, str]:
    """The environment of a ``dualwrite`` run on the test's Redis prefix and the stand-in."""
    return {
        "DUALWRITE_REDIS__URL": redis_url,
        "DUALWRITE_REDIS__KEY_PREFIX": key_prefix,
        "DUALWRITE_STRIPE__API_BASE": standin_url,
        "STRIPE_API_KEY": STRIPE_KEY,
        "COLUMNS": "250",
        **extra,
    }


def audit_entries(redis_url: str, key_prefix: str) -> list[OpsAuditEntry]:
    """The operations audit stream, oldest first."""

    async def read() -> list[OpsAuditEntry]:
        client = open_redis(RedisSettings(url=redis_url, key_prefix=key_prefix))
        try:
            return await OpsAudit(client, KeySpace(key_prefix)).entries()
        finally:
            await client.aclose()

    return list(reversed(asyncio.run(read())))


def refuse_meter_event(standin: StripeStandin, customer: str, value: int) -> None:
    """The stand-in refuses (400, for good) the customer's meter events of ``value``."""
    standin.faults.refuse(
        path=r"/v1/billing/meter_events",
        where={"payload[stripe_customer_id]": customer, "payload[value]": str(value)},
        status=400,
        code="parameter_invalid",
        message="refused by the test",
    )


def refuse_usage_record_once(standin: StripeStandin, item: str) -> None:
    """The stand-in refuses the item's next usage record (400: an authoritative refusal)."""
    standin.faults.refuse(
        path=rf"/v1/subscription_items/{item}/usage_records",
        status=400,
        code="parameter_invalid",
        message="authoritative refusal",
        count=1,
    )


@dataclass
class Scenario:
    """Stripe objects for one customer on a legacy metered price."""

    customer: str
    subscription: str
    item: str
    legacy_price: str
    meter_price: str
    meter: str


class ScenarioBuilder:
    """Builds customers with subscriptions on the stand-in through the official SDK."""

    def __init__(self, url: str, api_key: str):
        self.http = stripe.HTTPXClient()
        self.client = stripe.StripeClient(
            api_key, base_addresses={"api": url, "meter_events": url}, http_client=self.http
        )
        self._prices: tuple[str, str, str] | None = None

    async def aclose(self) -> None:
        """Close the SDK's connections."""
        await self.http.close_async()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _catalog(self) -> tuple[str, str, str]:
        if self._prices is None:
            meter = await self.client.v1.billing.meters.create_async(meter_params(EVENT_NAME))
            product = await self.client.v1.products.create_async({"name": "API"})
            legacy = await self.client.v1.prices.create_async(
                legacy_price_params(product.id), {"stripe_version": LEGACY_VERSION}
            )
            metered = await self.client.v1.prices.create_async(
                {
                    "currency": "usd",
                    "product": product.id,
                    "unit_amount": 1,
                    "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
                }
            )
            self._prices = (legacy.id, metered.id, meter.id)
        return self._prices

    async def customer(self, name: str = "Test customer", *, anchor: int | None = None) -> Scenario:
        """A new customer subscribed to the legacy metered price (its billing cycle anchored at
        ``anchor``, default: the stand-in's now)."""
        legacy, metered, meter = await self._catalog()
        return await self.subscribe(name, legacy, anchor=anchor, meter_price=metered, meter=meter)

    async def subscribe(
        self,
        name: str,
        price: str,
        *,
        anchor: int | None = None,
        meter_price: str = "",
        meter: str = "",
    ) -> Scenario:
        """A new customer subscribed to the legacy metered ``price``, its billing periods starting
        at ``anchor`` when given (so that several customers share one period)."""
        customer = await self.client.v1.customers.create_async({"name": name})
        params: SubscriptionCreateParams = {"customer": customer.id, "items": [{"price": price}]}
        if anchor is not None:
            params["billing_cycle_anchor"] = anchor
        subscription = await self.client.v1.subscriptions.create_async(
            params, {"stripe_version": LEGACY_VERSION}
        )
        item = subscription["items"]["data"][0]["id"]
        return Scenario(customer.id, subscription.id, item, price, meter_price, meter)

    async def meter_event(self, customer: str, value: int, timestamp: int) -> None:
        """A meter event of ``EVENT_NAME`` sent straight to Stripe, past dualwrite."""
        await self.client.v1.billing.meter_events.create_async(
            {
                "event_name": EVENT_NAME,
                "payload": {"stripe_customer_id": customer, "value": str(value)},
                "timestamp": timestamp,
            }
        )

    async def legacy_usage(self, item: str, quantity: int) -> None:
        """Report usage on the item straight to Stripe's legacy endpoint (not through dualwrite)."""
        await self.client.raw_request_async(
            "post",
            f"/v1/subscription_items/{item}/usage_records",
            quantity=quantity,
            stripe_version=LEGACY_VERSION,
        )

    async def move_to_meter_price(self, scenario: Scenario) -> None:
        """Move the item to the meter-backed price (what a cutover does at the period boundary)."""
        await self.client.v1.subscription_items.update_async(
            scenario.item, {"price": scenario.meter_price}
        )


async def set_stage(engine: DualWriteEngine, customer: str, stage: Stage) -> None:
    """Pin a customer to a stage and drop the engine's cached resolution."""
    store = RedisFlagStore(engine.redis, engine.keys)
    await store.set_override(customer, stage, actor="tests", reason="test set-up")
    invalidate = getattr(engine.resolver, "invalidate", None)
    if invalidate is not None:
        invalidate(customer)


def usage(
    scenario: Scenario,
    quantity: int = 5,
    *,
    identifier: str | None = None,
    action: str = "increment",
    timestamp: int | None = None,
) -> UsageEvent:
    """A usage event for the scenario's customer and item."""
    return UsageEvent(
        identifier=identifier or f"test-{time.time_ns()}",
        identifier_source="idempotency_key" if identifier else "minted",
        customer=scenario.customer,
        subscription_item=scenario.item,
        event_name=EVENT_NAME,
        quantity=quantity,
        timestamp=timestamp or int(time.time()),
        action=action,
    )


def utc(text: str) -> int:
    """``2027-01-31`` or ``2027-01-31T08:00:00`` (UTC) as Unix seconds."""
    moment = datetime.fromisoformat(text)
    return calendar.timegm(moment.replace(tzinfo=UTC).utctimetuple())


async def anchored_on(builder: ScenarioBuilder, standin: StripeStandin, anchor: int) -> Scenario:
    """A customer on the legacy price whose subscription starts (and is anchored) at ``anchor``,
    the stand-in's clock moved there to create it."""
    standin.clock.set(anchor)
    return await builder.customer("month end")


async def legacy_summaries(client: stripe.StripeClient, item: str) -> dict[tuple[int, int], int]:
    """Stripe's legacy totals of ``item`` per billing period, from its usage record summaries
    (``GET /v1/subscription_items/{si}/usage_record_summaries``, every page)."""
    totals: dict[tuple[int, int], int] = {}
    params: dict[str, Any] = {"limit": 100}
    while True:
        response = await client.raw_request_async(
            "get",
            f"/v1/subscription_items/{item}/usage_record_summaries",
            stripe_version=LEGACY_VERSION,
            **params,
        )
        page = json.loads(response.body)
        for summary in page["data"]:
            period = summary["period"]
            totals[(period["start"], period["end"])] = summary["total_usage"]
        if not page["has_more"]:
            return totals
        params["starting_after"] = page["data"][-1]["id"]


async def meter_summary(
    client: stripe.StripeClient, meter: str, customer: str, start: int, end: int
) -> float:
    """Stripe's meter total for ``customer`` over ``[start, end)`` (minute-aligned outward), from
    ``GET /v1/billing/meters/{id}/event_summaries``."""
    low, high = start - start % 60, end + (-end % 60)
    found = await client.v1.billing.meters.event_summaries.list_async(
        meter, {"customer": customer, "start_time": low, "end_time": high}
    )
    return float(sum(summary.aggregated_value for summary in found.data))


async def summary_totals(
    client: stripe.StripeClient, scenario: Scenario, *, days: int = 40
) -> tuple[int, float]:
    """The scenario's legacy total (every period) and meter total (the ``days`` around now) as
    Stripe's summary endpoints report them."""
    legacy = sum((await legacy_summaries(client, scenario.item)).values())
    now = int(time.time())
    meter = await meter_summary(
        client, scenario.meter, scenario.customer, now - days * 86_400, now + days * 86_400
    )
    return legacy, meter


async def eventually(check: Callable[[], bool], *, within: float, what: str) -> None:
    """Wait until ``check()`` holds, polling (what it waits for runs in another thread or
    process, with nothing to await on); fails naming ``what`` after ``within`` seconds."""
    try:
        with anyio.fail_after(within):
            while True:
                if check():
                    return
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"{what} did not happen within {within:g} s")


async def record_as_caller(
    engine: DualWriteEngine, event: UsageEvent, *, attempts: int = 100
) -> RecordOutcome:
    """Record ``event`` as a caller retrying with its Idempotency-Key does: again after a 409 (the
    same key in flight) or a refusal, until accepted; fails the test after ``attempts`` tries."""
    for _ in range(attempts):
        try:
            outcome = await engine.record(event)
        except ConflictError:
            await anyio.sleep(0.1)
            continue
        if outcome.accepted:
            return outcome
        await anyio.sleep(0.1)
    pytest.fail(f"usage {event.identifier} was never recorded")


def dualwrite_command(*args: str) -> list[str]:
    """``dualwrite ARGS`` as a process of its own (this interpreter, this checkout)."""
    return [sys.executable, "-c", "from dualwrite.cli import main; main()", *args]


async def cut_over_at_period_end(ops: CutoverOps, scenario: Scenario) -> tuple[int, str]:
    """Put a customer at shadow and cut it over to primary at its period end with the Stripe
    schedule that moves its item to the meter-backed price; the period end and the schedule's id."""
    await ops.store.set_override(scenario.customer, Stage.SHADOW, actor="ann")
    result = await ops.cutover(
        scenario.customer,
        Stage.PRIMARY,
        at="period-end",
        with_schedule=True,
        price=scenario.meter_price,
        actor="ann",
    )
    (end,) = [change.at for change in result.changes if change.new == "primary"]
    schedule = result.stripe_calls[1].result_id
    assert end is not None and schedule is not None
    return end, schedule
