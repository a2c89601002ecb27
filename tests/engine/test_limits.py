"""Shared rate limits and per-customer meter turns, on real Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from dualwrite.config import LimitSettings
from dualwrite.keys import KeySpace
from dualwrite.rate_limits import RateLimitedError, WriteLimits
from dualwrite.report import read_backpressure

pytestmark = pytest.mark.anyio


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:
    """Two separate connections, standing for two processes."""
    made = [aioredis.Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
    yield made
    for client in made:
        await client.aclose()


def limits_for(client: aioredis.Redis, prefix: str, **settings: float | bool) -> WriteLimits:
    """WriteLimits with the given settings under the test's prefix."""
    return WriteLimits(client, KeySpace(prefix), LimitSettings.model_validate(settings))


class TestRates:
    """The GCRA rate is shared by every process."""

    async def test_two_processes_share_one_rate(self, clients, key_prefix):
        """60 units at 100/s with a 0.1 s burst take at least 0.5 s, split over two limiters."""
        first, second = (
            limits_for(client, key_prefix, legacy_per_second=100, burst_seconds=0.1)
            for client in clients
        )
        started = time.monotonic()

        async def take(limits: WriteLimits) -> None:
            await limits.take("legacy", max_wait=10)

        async with anyio.create_task_group() as group:
            for limits in (first, second):
                for _ in range(30):
                    group.start_soon(take, limits)
        assert time.monotonic() - started >= 0.45  # a lower bound holds however slow the machine is
        assert sum(limits.stats.waits.get("legacy", 0) for limits in (first, second)) > 0

    async def test_no_room_within_max_wait_is_refused(self, clients, key_prefix):
        """Beyond the burst, a zero wait budget is refused with the time to wait."""
        limits = limits_for(clients[0], key_prefix, meter_per_second=10, burst_seconds=0.1)
        await limits.take("meter", max_wait=0)
        with pytest.raises(RateLimitedError) as info:
            for _ in range(5):
                await limits.take("meter", max_wait=0)
        assert 0 < info.value.retry_after <= 0.2
        assert limits.stats.refused == 1

    async def test_zero_rate_means_unlimited(self, clients, key_prefix):
        """A rate of 0 turns the limit off."""
        limits = limits_for(clients[0], key_prefix, stream_events_per_second=0)
        for _ in range(100):
            await limits.take("stream", cost=100, max_wait=0)  # raises if anything is limited
        assert limits.stats.grants.get("stream", 0) == 0  # never asked the shared rate
        assert limits.stats.refused == 0 and not limits.stats.waits
        assert await clients[1].exists(KeySpace(key_prefix).rate_limit("stream")) == 0

    async def test_a_batch_costs_its_size(self, clients, key_prefix):
        """A cost larger than the burst still passes once, and uses up the allowance."""
        limits = limits_for(
            clients[0], key_prefix, stream_events_per_second=1000, burst_seconds=0.01
        )
        await limits.take("stream", cost=100, max_wait=0)
        with pytest.raises(RateLimitedError):
            await limits.take("stream", cost=100, max_wait=0)


class TestTokenAsks:
    """A single unit asked for in another call's round trip (the legacy token with the claim)."""

    async def test_only_paths_taken_one_unit_at_a_time_are_asked(self, clients, key_prefix):
        """Legacy at 100/s is asked with the claim; an unlimited path or one taken in blocks is not."""
        limits = limits_for(
            clients[0], key_prefix, legacy_per_second=100, meter_per_second=1000, burst_seconds=0.1
        )
        assert limits.single_ask("legacy") is not None
        assert limits.single_ask("meter") is None  # blocks: no round trip per write to save
        assert limits_for(clients[0], key_prefix, legacy_per_second=0).single_ask("legacy") is None

    async def test_a_granted_unit_given_back_leaves_the_rate_as_it_was(self, clients, key_prefix):
        """Asked, granted and refunded: the next takes have the room they had before."""
        limits = limits_for(clients[0], key_prefix, legacy_per_second=10, burst_seconds=0.2)
        ask = limits.single_ask("legacy")
        assert ask is not None
        key = ask.keys[0]
        await limits.take("legacy", max_wait=0)
        before = int(await clients[1].get(key) or 0)
        reply = await ask.script(keys=ask.keys, args=ask.args)
        assert limits.granted(ask, reply)
        assert int(await clients[1].get(key) or 0) > before
        await limits.refund(ask)
        assert int(await clients[1].get(key) or 0) <= before

    async def test_a_unit_not_granted_at_once_is_not_counted(self, clients, key_prefix):
        """A reply asking to wait (or an error) is no grant: the write then takes its own unit."""
        limits = limits_for(clients[0], key_prefix, legacy_per_second=1, burst_seconds=0.1)
        ask = limits.single_ask("legacy")
        assert ask is not None
        assert limits.granted(ask, await ask.script(keys=ask.keys, args=ask.args))
        assert not limits.granted(ask, await ask.script(keys=ask.keys, args=ask.args))
        assert not limits.granted(ask, ConnectionError("lost"))
        assert limits.stats.grants["legacy"] == 1


class TestBlocks:
    """Single units of a fast rate come from the shared GCRA in blocks, and stay within it."""

    async def test_a_busy_process_asks_the_shared_rate_once_per_block(self, clients, key_prefix):
        """300 back-to-back meter units cost far fewer than 300 round trips to the shared rate."""
        limits = limits_for(clients[0], key_prefix, meter_per_second=1000, burst_seconds=0.1)

        async def take() -> None:
            await limits.take("meter", max_wait=10)

        async with anyio.create_task_group() as group:
            for _ in range(300):
                group.start_soon(take)
        assert limits.stats.grants["meter"] <= 300 // 4

    async def test_sparse_takes_ask_for_one_unit_at_a_time(self, clients, key_prefix):
        """A process taking a unit now and then takes blocks of one: no units wasted."""
        limits = limits_for(clients[0], key_prefix, meter_per_second=1000, burst_seconds=0.1)
        key = KeySpace(key_prefix).rate_limit("meter")
        for _ in range(3):
            await limits.take("meter", max_wait=1)
            await anyio.sleep(0.05)  # longer than a block lives (a quarter of the burst)
        assert limits.stats.grants["meter"] == 3
        assert 0 < await clients[1].pttl(key) <= 1001  # one unit's interval ahead, at most

    async def test_blocks_of_two_processes_keep_the_rate_over_every_window(
        self, clients, key_prefix
    ):
        """Over any 50 ms window two processes spending blocked units stay within rate x (window +
        burst), and 400 units need at least (400 - burst) / rate seconds."""
        rate, burst = 2000.0, 0.05
        limiters = [
            limits_for(client, key_prefix, meter_per_second=rate, burst_seconds=burst)
            for client in clients
        ]
        spent: list[float] = []

        async def take(limits: WriteLimits) -> None:
            await limits.take("meter", max_wait=10)
            spent.append(time.monotonic())

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            for limits in limiters:
                for _ in range(200):
                    group.start_soon(take, limits)
        assert time.monotonic() - started >= (400 - rate * burst) / rate
        assert all(limits.stats.grants["meter"] < 200 for limits in limiters)
        spent.sort()
        window = 0.05
        most = max(
            sum(1 for other in spent[index:] if other - moment <= window)
            for index, moment in enumerate(spent)
        )
        assert most <= rate * (window + burst) + 1

    async def test_a_burst_at_once_leaves_room_for_units_spent_late(self, clients, key_prefix):
        """Units of a block may be spent up to a quarter of the burst after the grant, so a burst
        taken at once is cut by that quarter: 1,000/s with a 0.4 s burst grants about 300, not 400."""
        limits = limits_for(clients[0], key_prefix, meter_per_second=1000, burst_seconds=0.4)
        taken = 0
        started = time.monotonic()
        with pytest.raises(RateLimitedError):
            while True:
                await limits.take("meter", max_wait=0)
                taken += 1
        elapsed = time.monotonic() - started
        assert 250 <= taken <= 300 + 1000 * elapsed + 1

    async def test_a_slow_path_is_never_blocked(self, clients, key_prefix):
        """At 100/s with a 0.1 s burst a block would not fit a quarter of it: units go one by one."""
        limits = limits_for(clients[0], key_prefix, legacy_per_second=100, burst_seconds=0.1)
        for _ in range(5):
            await limits.take("legacy", max_wait=1)
        assert limits.stats.grants["legacy"] == 5


class TestMeterTurns:
    """One meter call in flight per customer and meter."""

    async def test_same_customer_waits_its_turn(self, clients, key_prefix):
        """Two holders for one customer never overlap."""
        limits = [limits_for(client, key_prefix) for client in clients]
        inside: list[int] = []
        overlaps = 0

        async def hold(which: WriteLimits) -> None:
            nonlocal overlaps
            async with which.meter_turn("cus_1", "api", max_wait=5):
                inside.append(1)
                overlaps = max(overlaps, len(inside))
                await anyio.sleep(0.05)
                inside.pop()

        async with anyio.create_task_group() as group:
            for which in limits * 3:
                group.start_soon(hold, which)
        assert overlaps == 1

    async def test_other_customers_do_not_wait(self, clients, key_prefix):
        """A held turn for one customer leaves another customer free."""
        limits = limits_for(clients[0], key_prefix)
        keys = KeySpace(key_prefix)
        async with (
            limits.meter_turn("cus_1", "api", max_wait=0) as first,
            limits.meter_turn("cus_2", "api", max_wait=0) as second,
        ):
            # Both held at once, each on its own lease: neither waited, neither was refused.
            assert first is not None and second is not None and first.key != second.key
            for customer, turn in (("cus_1", first), ("cus_2", second)):
                key = keys.for_customer(customer).meter_turn(customer, "api")
                assert turn.key == key and await clients[1].get(key) == turn.token
        assert limits.stats.refused == 0 and not limits.stats.waits

    async def test_busy_turn_refused_after_max_wait(self, clients, key_prefix):
        """A turn held longer than max_wait refuses the second caller."""
        first, second = (limits_for(client, key_prefix) for client in clients)
        async with first.meter_turn("cus_1", "api", max_wait=0):
            with pytest.raises(RateLimitedError):
                async with second.meter_turn("cus_1", "api", max_wait=0.05):
                    pass

    async def test_dead_holders_lease_expires(self, clients, key_prefix):
        """A turn never released (its process died) frees itself after the lease: the lease is
        set on the turn when it is taken, and another process gets the turn once it runs out."""
        dead, alive = (limits_for(client, key_prefix, turn_lease_seconds=0.3) for client in clients)
        async with dead.meter_turn("cus_9", "api", max_wait=0) as turn:
            assert turn is not None
            turn.released = True  # the process dies holding it: nothing releases it on leaving
        assert await clients[1].get(turn.key) == turn.token  # still held by the dead process
        assert 0 < await clients[1].pttl(turn.key) <= 300  # ...on a lease, not forever
        with pytest.raises(RateLimitedError):  # held: the living wait
            async with alive.meter_turn("cus_9", "api", max_wait=0):
                pass
        async with alive.meter_turn("cus_9", "api", max_wait=5) as taken:
            assert taken is not None and taken.token != turn.token
            assert await clients[0].get(taken.key) == taken.token
        assert alive.stats.waits.get("meter_turn", 0) == 1

    async def test_turns_can_be_switched_off(self, clients, key_prefix):
        """With one_meter_call_per_customer off, turns never block."""
        limits = limits_for(clients[0], key_prefix, one_meter_call_per_customer=False)
        async with (
            limits.meter_turn("cus_1", "api", max_wait=0) as first,
            limits.meter_turn("cus_1", "api", max_wait=0) as second,
        ):
            assert first is None and second is None  # no turn taken, none to wait for
        key = KeySpace(key_prefix).for_customer("cus_1").meter_turn("cus_1", "api")
        assert await clients[1].exists(key) == 0
        assert limits.stats.refused == 0 and not limits.stats.waits


class TestBackpressure:
    """Waits and held-back writes are counted where every process and the report can see them."""

    async def test_counts_reach_redis(self, clients, key_prefix):
        """A wait and a refusal show up in the shared back-pressure counters."""
        limits = limits_for(clients[0], key_prefix, legacy_per_second=20, burst_seconds=0.05)
        await limits.take("legacy", max_wait=1)
        await limits.take("legacy", max_wait=1)  # waits for its turn
        with pytest.raises(RateLimitedError):
            for _ in range(5):
                await limits.take("legacy", max_wait=0)
        counts = await read_backpressure(clients[1], KeySpace(key_prefix))
        assert counts["legacy_waits"] >= 1 and counts["legacy_waited_ms"] > 0
        assert counts["legacy_held_back"] == 1
