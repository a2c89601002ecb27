"""Redis round trips per usage request, at each stage (issue 20), counted on a real connection.

Each command (or pipeline) written to Redis is one round trip: the test counts the writes of the
engine's connections (``send_packed_command``) while it records events. The stage is resolved
from the flag cache (no round trip); what is left is the claim (with the legacy rate limit's
token in the same round trip when the legacy leg is authoritative), the meter's per-customer turn
(taken and given back) and its rate, and the commit. A new round trip on the usage path makes this
fail: add it to ``BUDGET`` only with a reason.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import anyio
import pytest
import redis.asyncio as aioredis

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage, UsageEvent
from tests.proxy.test_proxy import proxy_settings
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, set_stage

pytestmark = pytest.mark.anyio

#: Round trips per usage event: claim (with the legacy rate limit's token) and commit; at the
#: meter-first stages, the meter's rate and its turn (taken and given back) add up to three.
BUDGET = {Stage.LEGACY: 2, Stage.SHADOW: 2, Stage.PRIMARY: 5, Stage.METER: 5}


class CountingConnection(aioredis.Connection):
    """A Redis connection counting what it sends (one send: one round trip)."""

    sent: ClassVar[int] = 0
    commands: ClassVar[list[str]] = []

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Count, then send."""
        CountingConnection.sent += 1
        first = command[0] if isinstance(command, list) else command
        CountingConnection.commands.append(bytes(first)[:80].decode(errors="replace"))
        await super().send_packed_command(command, check_health)


@pytest.fixture
async def scenario(builder: ScenarioBuilder) -> Scenario:
    """A customer on the legacy metered price."""
    return await builder.customer()


@pytest.fixture
async def counted(
    redis_url: str, key_prefix: str, standin_url: str, scenario: Scenario
) -> AsyncIterator[DualWriteEngine]:
    """An engine whose Redis connections count their round trips."""
    settings: Settings = proxy_settings(
        redis_url, key_prefix, standin_url, legacy_price=scenario.legacy_price
    )
    engine = DualWriteEngine.from_settings(settings)
    engine.redis.connection_pool.connection_class = CountingConnection
    await engine.start(worker=False)
    yield engine
    await engine.aclose()


def event(scenario: Scenario, *, keyed: bool) -> UsageEvent:
    """One usage event, with the caller's identifier or a minted one."""
    return UsageEvent(
        identifier=f"rt-{uuid.uuid4().hex}" if keyed else f"dwev_{uuid.uuid4().hex}",
        identifier_source="idempotency_key" if keyed else "minted",
        customer=scenario.customer,
        subscription_item=scenario.item,
        event_name=EVENT_NAME,
        quantity=2,
        timestamp=int(time.time()),
    )


@pytest.mark.parametrize("keyed", [True, False], ids=["caller-keyed", "minted"])
@pytest.mark.parametrize("stage", list(Stage))
async def test_round_trips_per_usage_event(stage, keyed, counted, scenario):
    """Recording one event costs at most its stage's budget of Redis round trips."""
    await set_stage(counted, scenario.customer, stage)
    await counted.record(event(scenario, keyed=keyed))  # warm: scripts loaded, period cached
    await anyio.sleep(0.3)  # the flag cache reloads once after set_stage's change message
    await counted.record(event(scenario, keyed=keyed))
    CountingConnection.sent = 0
    CountingConnection.commands = []
    events = 6
    for _ in range(events):
        assert (await counted.record(event(scenario, keyed=keyed))).accepted
    per_event = CountingConnection.sent / events
    assert per_event <= BUDGET[stage], (
        f"{per_event:.2f} round trips per event at {stage.value}: {CountingConnection.commands}"
    )
    assert per_event >= 2  # claim and commit at least: the counter counts


class TestLegacyTokenWithClaim:
    """The legacy rate limit's token is taken in the claim's round trip, and given back when the
    claim holds no write."""

    async def test_each_new_write_takes_one_unit(self, counted, scenario):
        """Every legacy write is granted exactly one unit of the shared rate, with its claim."""
        await set_stage(counted, scenario.customer, Stage.LEGACY)
        limits = counted.writer.limits
        assert limits is not None
        before = limits.stats.grants.get("legacy", 0)
        for _ in range(4):
            assert (await counted.record(event(scenario, keyed=True))).accepted
        assert limits.stats.grants.get("legacy", 0) - before == 4

    async def test_replayed_claim_gives_its_token_back(self, counted, scenario, redis_url):
        """A caller's retry answered from the record takes no unit of the legacy rate."""
        await set_stage(counted, scenario.customer, Stage.LEGACY)
        first = event(scenario, keyed=True)
        assert (await counted.record(first)).accepted
        key = counted.keys.rate_limit("legacy")
        reader = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            before = int(await reader.get(key) or 0)
            replay = await counted.record(first)
            after = int(await reader.get(key) or 0)
        finally:
            await reader.aclose()
        assert replay.replayed
        # Taken and not given back, the arrival time would be at least one interval past ``before``
        # (or past now, if ``before`` was already behind).
        assert after <= before
