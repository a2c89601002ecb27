"""Stage flags: the store and its audit, the resolution rules, and the cached resolver (real Redis)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from hypothesis import given, strategies as st

from dualwrite.config import FlagSettings
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.flags import (
    ROLLOUT_STAGES,
    FlagSnapshot,
    RedisFlagStore,
    StageResolver,
    resolve_snapshot,
    rollout_bucket,
    rollout_stage,
)
from dualwrite.flags._resolution import rollout_stages
from dualwrite.keys import KeySpace
from dualwrite.models import Stage

pytestmark = pytest.mark.anyio

SALT = "dualwrite-rollout-v1"
T0 = 1_800_000_000.0


class Clock:
    """A settable stand-in for ``time.time``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys(key_prefix: str) -> KeySpace:
    """This test's key space."""
    return KeySpace(key_prefix)


@pytest.fixture
def clock() -> Clock:
    """A clock the test moves by hand."""
    return Clock()


@pytest.fixture
def store(redis_client: aioredis.Redis, keys: KeySpace, clock: Clock) -> RedisFlagStore:
    """A flag store on the test Redis, on the test clock."""
    return RedisFlagStore(redis_client, keys, clock=clock)


@pytest.fixture
async def other_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A second client (own connections), standing for another process."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float = 2.0) -> float:
    """Poll ``condition`` until true; return the seconds it took (fail after ``within``)."""
    start = time.perf_counter()
    async with asyncio.timeout(within):
        while True:
            if await condition():
                return time.perf_counter() - start
            await asyncio.sleep(0.001)


def snap(**fields: object) -> FlagSnapshot:
    """A snapshot for customer ``cus_a``."""
    return FlagSnapshot.model_validate({"customer": "cus_a", **fields})


class TestRolloutBucket:
    """The stable hash behind percentage rollouts."""

    def test_formula_is_pinned(self):
        """The bucket formula never changes: these values are fixed forever."""
        assert rollout_bucket("cus_1", SALT) == 2379
        assert rollout_bucket("cus_NffrFeUfNV2Hib", SALT) == 3272
        assert rollout_bucket("cus_1", "other-salt") == 3591

    def test_roughly_uniform(self):
        """About a quarter of 10,000 customers fall in a 25 % rollout."""
        rollout = {Stage.SHADOW: 25.0}
        inside = sum(
            resolve_snapshot(f"cus_{i}", snap(rollout=rollout), now=T0, salt=SALT).stage
            is Stage.SHADOW
            for i in range(10_000)
        )
        assert 2300 <= inside <= 2700

    @given(
        customers=st.lists(st.text(max_size=40), max_size=50),
        salt=st.text(min_size=1, max_size=20),
        percents=st.lists(st.floats(0, 100), min_size=3, max_size=3),
        default=st.sampled_from(list(Stage)),
    )
    def test_many_at_once_as_one_by_one(self, customers, salt, percents, default):
        """rollout_stages (the report's batch) gives each customer rollout_stage of its bucket."""
        rollout = dict(zip(ROLLOUT_STAGES, percents, strict=True))
        expected = [
            rollout_stage(rollout_bucket(customer, salt), rollout) or default
            for customer in customers
        ]
        assert rollout_stages(customers, rollout, default, salt) == expected
        assert rollout_stages(customers, {}, default, salt) == [default] * len(customers)

    @given(
        customer=st.text(min_size=1, max_size=40),
        salt=st.text(min_size=1, max_size=20),
        before=st.lists(st.integers(0, 10_000), min_size=3, max_size=3),
        stage=st.sampled_from(ROLLOUT_STAGES),
        raise_by=st.integers(0, 10_000),
        default=st.sampled_from(list(Stage)),
    )
    def test_raising_a_percentage_only_adds_customers(
        self, customer, salt, before, stage, raise_by, default
    ):
        """Raising stage X's percentage moves customers into X only, never out of a later stage."""
        old = {s: points / 100 for s, points in zip(ROLLOUT_STAGES, before, strict=True)}
        new = {**old, stage: min(10_000, round(old[stage] * 100) + raise_by) / 100}
        was = resolve_snapshot(customer, snap(rollout=old, default=default), now=T0, salt=salt)
        now = resolve_snapshot(customer, snap(rollout=new, default=default), now=T0, salt=salt)
        assert now.stage in (was.stage, stage)
        if was.reason == "rollout" and was.stage.rank >= stage.rank:
            assert (now.stage, now.reason) == (was.stage, "rollout")


class TestResolveSnapshot:
    """The pure resolution rule, first match wins."""

    def test_order(self):
        """Kill beats override beats schedule beats rollout beats default."""
        full = {
            "kill": True,
            "override": Stage.PRIMARY,
            "schedule": ((int(T0) - 10, Stage.SHADOW),),
            "rollout": {Stage.METER: 100.0},
            "default": Stage.PRIMARY,
        }
        expected = [
            ("kill", Stage.LEGACY),
            ("override", Stage.PRIMARY),
            ("schedule", Stage.SHADOW),
            ("rollout", Stage.METER),
            ("default", Stage.PRIMARY),
        ]
        for field, (reason, stage) in zip(list(full), expected, strict=True):
            result = resolve_snapshot("cus_a", snap(**full), now=T0, salt=SALT)
            assert (result.reason, result.stage) == (reason, stage)
            del full[field]

    def test_schedule_switches_exactly_at(self):
        """The latest entry with at <= now applies; valid_until is the next entry's time."""
        schedule = ((1000, Stage.SHADOW), (3000, Stage.METER), (2000, Stage.PRIMARY))
        results = {
            now: resolve_snapshot("cus_a", snap(schedule=schedule), now=now, salt=SALT)
            for now in (999.999, 1000, 1999.5, 2000, 3000)
        }
        assert results[999.999].reason == "default"
        assert results[999.999].valid_until == 1000
        assert results[1000].stage is Stage.SHADOW
        assert results[1000].valid_until == 2000
        assert results[1999.5].stage is Stage.SHADOW
        assert results[2000].stage is Stage.PRIMARY
        assert (results[3000].stage, results[3000].valid_until) == (Stage.METER, None)

    def test_most_advanced_rollout_wins(self):
        """A customer in several rollouts gets the most advanced stage."""
        rollout = {Stage.SHADOW: 100.0, Stage.PRIMARY: 100.0, Stage.METER: 0.0}
        result = resolve_snapshot("cus_a", snap(rollout=rollout), now=T0, salt=SALT)
        assert (result.stage, result.reason) == (Stage.PRIMARY, "rollout")


class TestStoreChanges:
    """Each setter changes the flag, writes an audit entry and announces the change."""

    async def test_default(self, store, clock):
        """set_default is read back and audited with who, when, old, new and why."""
        assert await store.get_default() is Stage.LEGACY
        await store.set_default(Stage.SHADOW, actor="ana", reason="start")
        clock.now += 5
        await store.set_default(Stage.PRIMARY, actor="bob")
        assert await store.get_default() is Stage.PRIMARY
        newest, oldest = await store.history()
        assert newest.model_dump(exclude={"id"}) == {
            "at": T0 + 5,
            "actor": "bob",
            "action": "set_default",
            "customer": "*",
            "old": "shadow",
            "new": "primary",
            "reason": "",
        }
        assert (oldest.actor, oldest.at, oldest.old, oldest.new) == ("ana", T0, None, "shadow")
        assert oldest.reason == "start"

    async def test_override(self, store):
        """An override is set, listed, removed with None, and each step is audited."""
        await store.set_override("cus_a", Stage.METER, actor="ana", reason="pilot")
        assert await store.overrides() == {"cus_a": Stage.METER}
        await store.set_override("cus_a", None, actor="ana")
        assert await store.overrides() == {}
        removed, added = await store.history(customer="cus_a")
        assert (added.action, added.old, added.new, added.reason) == (
            "set_override",
            None,
            "meter",
            "pilot",
        )
        assert (removed.action, removed.old, removed.new) == ("remove_override", "meter", None)

    async def test_rollout(self, store):
        """Rollout percentages are stored per stage and audited."""
        await store.set_rollout(Stage.SHADOW, 25, actor="ana")
        await store.set_rollout(Stage.METER, 0.05, actor="ana", reason="canary")
        assert await store.get_rollout() == {
            Stage.SHADOW: 25.0,
            Stage.PRIMARY: 0.0,
            Stage.METER: 0.05,
        }
        (entry,) = await store.history(limit=1)
        assert (entry.action, entry.customer, entry.new, entry.reason) == (
            "set_rollout:meter",
            "*",
            "0.05",
            "canary",
        )

    @pytest.mark.parametrize(
        ("stage", "percent", "message"),
        [
            (Stage.SHADOW, -1, "between 0 and 100"),
            (Stage.SHADOW, 100.01, "between 0 and 100"),
            (Stage.SHADOW, math.nan, "between 0 and 100"),
            (Stage.PRIMARY, 12.345, "two decimals"),
            (Stage.LEGACY, 10, "shadow, primary or meter"),
        ],
    )
    async def test_rollout_refuses(self, store, stage, percent, message):
        """Out-of-range, too precise or non-rollout values raise a clear ValueError."""
        with pytest.raises(ValueError, match=message):
            await store.set_rollout(stage, percent, actor="ana")
        assert await store.history() == []

    async def test_schedule(self, store):
        """Entries stay sorted, the same at replaces, clear_schedule removes all; all audited."""
        await store.schedule("cus_a", Stage.PRIMARY, 2000, actor="ana")
        await store.schedule("cus_a", Stage.SHADOW, 1000, actor="ana")
        await store.schedule("cus_a", Stage.METER, 2000, actor="bob", reason="skip primary")
        assert await store.schedules() == {"cus_a": [(1000, Stage.SHADOW), (2000, Stage.METER)]}
        latest = (await store.history(limit=1))[0]
        assert (latest.actor, latest.action, latest.reason) == ("bob", "schedule", "skip primary")
        assert latest.old == '[[1000,"shadow"],[2000,"primary"]]'
        assert latest.new == '[[1000,"shadow"],[2000,"meter"]]'
        await store.clear_schedule("cus_a", actor="ana")
        assert await store.schedules() == {}
        (cleared,) = await store.history(limit=1)
        assert (cleared.action, cleared.new) == ("clear_schedule", None)

    async def test_kill(self, store):
        """The kill switch goes on and off, audited."""
        assert await store.get_kill() is False
        await store.set_kill(True, actor="oncall", reason="incident 42")
        assert await store.get_kill() is True
        await store.set_kill(False, actor="oncall")
        off, on = await store.history()
        assert (on.action, on.old, on.new, on.reason) == ("set_kill", None, "1", "incident 42")
        assert (off.old, off.new) == ("1", "0")

    async def test_bad_input(self, store):
        """Malformed customers, times and missing actors are refused before touching Redis."""
        with pytest.raises(ValueError, match="customer"):
            await store.set_override("*", Stage.METER, actor="ana")
        with pytest.raises(ValueError, match="Unix timestamp"):
            await store.schedule("cus_a", Stage.METER, 0, actor="ana")
        with pytest.raises(ValueError, match="actor"):
            await store.set_kill(True, actor=" ")
        with pytest.raises(ValueError):
            await store.set_default("turbo", actor="ana")
        assert await store.history() == []

    async def test_publishes_changes(self, store, redis_client, keys):
        """Every change publishes the customer id, or * for a global one."""
        async with redis_client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(keys.flags_channel)
            await store.set_override("cus_a", Stage.SHADOW, actor="ana")
            await store.set_kill(True, actor="ana")
            seen: list[str] = []
            async with asyncio.timeout(2):
                while len(seen) < 2:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message:
                        seen.append(message["data"])
        assert seen == ["cus_a", "*"]

    async def test_history_filters_and_limits(self, store):
        """history() is newest first, honours limit and filters by customer across pages."""
        await store.set_override("cus_a", Stage.SHADOW, actor="ana")
        for index in range(600):
            await store.set_override(f"cus_{index}", Stage.METER, actor="ana")
        assert [e.customer for e in await store.history(limit=2)] == ["cus_599", "cus_598"]
        (only,) = await store.history(customer="cus_a")
        assert only.new == "shadow"

    async def test_concurrent_changes_keep_the_audit_complete(self, store, redis_url, keys):
        """Concurrent writers from several connections lose no audit entry, no schedule entry."""
        clients = [aioredis.Redis.from_url(redis_url, decode_responses=True) for _ in range(4)]
        stores = [RedisFlagStore(client, keys) for client in clients]
        try:
            stages = list(Stage)
            await asyncio.gather(
                *(
                    stores[i % 4].set_override("cus_a", stages[i % 4], actor=f"w{i}")
                    for i in range(60)
                ),
                *(
                    stores[i % 4].schedule("cus_b", Stage.METER, 1000 + i, actor=f"w{i}")
                    for i in range(30)
                ),
            )
        finally:
            for client in clients:
                await client.aclose()
        chain = list(reversed(await store.history(limit=1000, customer="cus_a")))
        assert sorted(e.actor for e in chain) == sorted(f"w{i}" for i in range(60))
        for earlier, later in itertools.pairwise(chain):
            assert later.old == earlier.new
        assert (await store.overrides())["cus_a"].value == chain[-1].new
        assert len(await store.history(limit=1000, customer="cus_b")) == 30
        assert len((await store.schedules())["cus_b"]) == 30


class TestStoreReads:
    """Reading flags back: one snapshot per customer, and values edited by hand."""

    async def test_snapshot(self, store):
        """A snapshot carries kill, default, rollout, the override and the schedule."""
        await store.set_default(Stage.SHADOW, actor="ana")
        await store.set_rollout(Stage.PRIMARY, 10, actor="ana")
        await store.set_override("cus_a", Stage.METER, actor="ana")
        await store.schedule("cus_a", Stage.PRIMARY, 1000, actor="ana")
        assert await store.snapshot("cus_a") == FlagSnapshot(
            customer="cus_a",
            kill=False,
            default=Stage.SHADOW,
            rollout={Stage.SHADOW: 0.0, Stage.PRIMARY: 10.0, Stage.METER: 0.0},
            override=Stage.METER,
            schedule=((1000, Stage.PRIMARY),),
        )

    async def test_invalid_values_are_ignored_with_a_warning(
        self, store, redis_client, keys, caplog
    ):
        """Hand-edited junk reads as absent (and is logged) instead of breaking resolution."""
        await redis_client.hset(
            keys.flags_config,
            mapping={"default": "turbo", "kill": "maybe", "rollout:meter": "lots"},
        )
        await redis_client.hset(keys.flags_override, mapping={"cus_a": "bogus", "cus_b": "meter"})
        await redis_client.hset(
            keys.flags_schedule,
            mapping={"cus_a": '[[1000,"primary"],[2000,"warp"],["x","meter"]]', "cus_b": "{"},
        )
        with caplog.at_level(logging.WARNING, logger="dualwrite.flags"):
            snapshot = await store.snapshot("cus_a")
            assert await store.overrides() == {"cus_b": Stage.METER}
            assert await store.schedules() == {"cus_a": [(1000, Stage.PRIMARY)]}
        assert snapshot == FlagSnapshot(
            customer="cus_a",
            rollout={stage: 0.0 for stage in ROLLOUT_STAGES},
            schedule=((1000, Stage.PRIMARY),),
        )
        for junk in ("'turbo'", "'maybe'", "'lots'", "'bogus'", "'warp'", "['x', 'meter']", "'{'"):
            assert junk in caplog.text
        await store.schedule("cus_a", Stage.METER, 3000, actor="ana")
        assert (await store.schedules())["cus_a"] == [(1000, Stage.PRIMARY), (3000, Stage.METER)]

    async def test_redis_errors_are_translated(self, store, redis_client, keys):
        """A Redis error surfaces as StoreUnavailableError, chained to the original."""
        await redis_client.set(keys.flags_override, "not a hash")
        with pytest.raises(StoreUnavailableError) as info:
            await store.set_override("cus_a", Stage.METER, actor="ana")
        assert info.value.__cause__ is not None


@pytest.fixture
async def resolver(
    other_client: aioredis.Redis, keys: KeySpace, clock: Clock
) -> AsyncIterator[StageResolver]:
    """A started resolver on its own connections, the test clock and a long TTL."""
    async with StageResolver(other_client, keys, FlagSettings(cache_ttl=60), clock=clock) as res:
        yield res


class TestStageResolver:
    """Cached resolution, invalidation over pub/sub, and the safe stage when Redis fails."""

    async def test_resolution_order(self, store, resolver):
        """Through Redis: kill beats override beats schedule beats rollout beats default."""
        await store.set_default(Stage.SHADOW, actor="ana")
        await store.set_rollout(Stage.METER, 100, actor="ana")
        await store.schedule("cus_a", Stage.PRIMARY, int(T0), actor="ana")
        await store.set_override("cus_a", Stage.SHADOW, actor="ana")
        await store.set_kill(True, actor="ana")
        undo: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("kill", lambda: store.set_kill(False, actor="ana")),
            ("override", lambda: store.set_override("cus_a", None, actor="ana")),
            ("schedule", lambda: store.clear_schedule("cus_a", actor="ana")),
            ("rollout", lambda: store.set_rollout(Stage.METER, 0, actor="ana")),
        ]
        for reason, change in undo:
            assert (await resolver.explain("cus_a")).reason == reason
            await change()
            await wait_for(functools.partial(_reason_is_not, resolver, reason))
        result = await resolver.explain("cus_a")
        assert (result.reason, result.stage) == ("default", Stage.SHADOW)

    async def test_cache_hits_do_not_read_redis(self, resolver, redis_client, keys, clock):
        """A cached stage is served until the TTL even if Redis changes unannounced."""
        assert await resolver.resolve("cus_a") is Stage.LEGACY
        await redis_client.hset(keys.flags_override, "cus_a", "meter")  # no PUBLISH
        assert await resolver.resolve("cus_a") is Stage.LEGACY
        assert (resolver.stats.hits, resolver.stats.misses) == (1, 1)
        clock.now += 60
        assert await resolver.resolve("cus_a") is Stage.METER

    async def test_schedule_switches_exactly_at_and_cache_expires_then(
        self, store, resolver, clock
    ):
        """A cached stage never outlives the customer's next scheduled change."""
        at = int(T0) + 10
        await resolver.resolve("cus_a")
        await store.schedule("cus_a", Stage.SHADOW, at, actor="ana")
        await wait_for(lambda: _empty(resolver))  # the change's message has arrived
        clock.now = at - 0.001
        result = await resolver.explain("cus_a")
        assert (result.stage, result.valid_until) == (Stage.LEGACY, at)
        assert await resolver.resolve("cus_a") is Stage.LEGACY
        clock.now = at
        assert await resolver.resolve("cus_a") is Stage.SHADOW
        assert (resolver.stats.hits, resolver.stats.misses) == (1, 3)

    async def test_second_instance_sees_changes_quickly(self, store, resolver):
        """A change through the store reaches another process's cache well within the TTL."""
        assert await resolver.resolve("cus_a") is Stage.LEGACY
        assert await resolver.resolve("cus_b") is Stage.LEGACY
        await store.set_override("cus_a", Stage.PRIMARY, actor="ana")
        await wait_for(lambda: _resolves(resolver, "cus_a", Stage.PRIMARY))
        assert "cus_b" in resolver._cache  # only the changed customer was dropped
        await store.set_default(Stage.SHADOW, actor="ana")
        await wait_for(lambda: _resolves(resolver, "cus_b", Stage.SHADOW))

    async def test_resubscribes_after_the_connection_drops(
        self, store, redis_url, redis_client, keys, key_prefix
    ):
        """A killed pub/sub connection drops the cache, and later changes are still seen."""
        name = f"{key_prefix}-sub"
        client = aioredis.Redis.from_url(redis_url, decode_responses=True, client_name=name)
        settings = FlagSettings(cache_ttl=60)
        try:
            async with StageResolver(client, keys, settings) as resolver:
                assert resolver.subscribed
                await resolver.resolve("cus_a")
                before = resolver.stats.invalidations
                subscribers = [
                    c
                    for c in await redis_client.client_list()
                    if c["name"] == name and c["sub"] != "0"
                ]
                assert len(subscribers) == 1
                await redis_client.client_kill_filter(_id=subscribers[0]["id"])
                await wait_for(lambda: _invalidated_since(resolver, before))
                assert "cus_a" not in resolver._cache
                await wait_for(lambda: _subscribed(resolver))
                await resolver.resolve("cus_a")
                await store.set_override("cus_a", Stage.METER, actor="ana")
                await wait_for(lambda: _resolves(resolver, "cus_a", Stage.METER))
        finally:
            await client.aclose()

    async def test_change_during_lookup_is_not_cached(self, store, resolver, monkeypatch):
        """A resolution read before an invalidation is not cached after it."""
        read = resolver._store.snapshot

        async def racing(customer: str) -> FlagSnapshot:
            snapshot: FlagSnapshot = await read(customer)
            resolver.invalidate(customer)  # as if the change's message arrived meanwhile
            return snapshot

        monkeypatch.setattr(resolver._store, "snapshot", racing)
        await resolver.resolve("cus_a")
        assert "cus_a" not in resolver._cache

    async def test_invalidate_locally(self, resolver):
        """invalidate() drops one customer or everyone, and counts."""
        for customer in ("cus_a", "cus_b", "cus_c"):
            await resolver.resolve(customer)
        before = resolver.stats.invalidations
        resolver.invalidate("cus_a")
        assert set(resolver._cache) == {"cus_b", "cus_c"}
        resolver.invalidate()
        assert resolver._cache == {}
        assert resolver.stats.invalidations == before + 2

    async def test_cache_is_bounded(self, other_client, keys):
        """Beyond max_entries the oldest entries make room."""
        resolver = StageResolver(other_client, keys, FlagSettings(), max_entries=3)
        for index in range(5):
            await resolver.resolve(f"cus_{index}")
        assert list(resolver._cache) == ["cus_2", "cus_3", "cus_4"]

    async def test_unreachable_redis_gives_the_safe_stage(self, keys, caplog):
        """With Redis down, resolve answers the safe stage, counts it, warns once, never raises."""
        client = aioredis.Redis.from_url(
            "redis://:hunter2@127.0.0.1:1/0",
            decode_responses=True,
            socket_connect_timeout=0.2,
            socket_timeout=0.2,
        )
        settings = FlagSettings(safe_stage=Stage.SHADOW)
        try:
            with caplog.at_level(logging.WARNING, logger="dualwrite.flags"):
                async with StageResolver(client, keys, settings, lookup_timeout=0.3) as resolver:
                    assert not resolver.subscribed
                    for customer in ("cus_a", "cus_b", "cus_a"):
                        assert await resolver.resolve(customer) is Stage.SHADOW
                    result = await resolver.explain("cus_a")
        finally:
            await client.aclose()
        assert result.reason == "safe"
        assert resolver.stats.safe_fallbacks == 4
        assert resolver._cache == {}
        lookups = [r for r in caplog.records if "stage lookup failed" in r.getMessage()]
        assert len(lookups) == 1
        assert "hunter2" not in caplog.text
        assert "127.0.0.1:1" not in caplog.text

    async def test_recovers_after_a_redis_error(self, resolver, redis_client, keys):
        """A Redis error answers the safe stage, uncached; the next lookup after it recovers."""
        await redis_client.set(keys.flags_override, "not a hash")
        result = await resolver.explain("cus_a")
        assert (result.stage, result.reason) == (Stage.LEGACY, "safe")
        await redis_client.delete(keys.flags_override)
        await redis_client.hset(keys.flags_override, "cus_a", "meter")
        await wait_for(lambda: _resolves(resolver, "cus_a", Stage.METER))
        assert resolver.stats.safe_fallbacks >= 1

    async def test_unexpected_errors_give_the_safe_stage(self, resolver, monkeypatch, caplog):
        """Even a bug in the lookup answers the safe stage (logged with its traceback)."""

        async def broken(customer: str) -> FlagSnapshot:
            raise ZeroDivisionError

        monkeypatch.setattr(resolver._store, "snapshot", broken)
        with caplog.at_level(logging.WARNING, logger="dualwrite.flags"):
            assert (await resolver.explain("cus_a")).reason == "safe"
        assert "ZeroDivisionError" in caplog.text
        assert resolver.stats.safe_fallbacks == 1

    async def test_close_is_idempotent_and_clean(self, other_client, keys):
        """aclose() stops the listener, twice without harm; resolve keeps working without it."""
        resolver = StageResolver(other_client, keys, FlagSettings())
        await resolver.start()
        await resolver.start()
        assert resolver.subscribed
        await resolver.aclose()
        await resolver.aclose()
        assert await resolver.resolve("cus_a") is Stage.LEGACY


async def _reason_is_not(resolver: StageResolver, reason: str) -> bool:
    return (await resolver.explain("cus_a")).reason != reason


async def _resolves(resolver: StageResolver, customer: str, stage: Stage) -> bool:
    return await resolver.resolve(customer) is stage


async def _empty(resolver: StageResolver) -> bool:
    return not resolver._cache


async def _subscribed(resolver: StageResolver) -> bool:
    return resolver.subscribed


async def _invalidated_since(resolver: StageResolver, count: int) -> bool:
    return resolver.stats.invalidations > count


class TestResolveMany:
    """Resolving many customers at once gives exactly what resolving them one by one gives."""

    async def test_same_stages_as_one_by_one(self, store: RedisFlagStore, resolver, clock):
        """Overrides, schedules, rollout and default: resolve_many agrees with explain, per customer."""
        customers = [f"cus_many{index}" for index in range(300)]
        await store.set_default(Stage.SHADOW, actor="tests")
        await store.set_rollout(Stage.PRIMARY, 20, actor="tests")
        await store.set_rollout(Stage.METER, 5, actor="tests")
        for customer in customers[:10]:
            await store.set_override(customer, Stage.LEGACY, actor="tests")
        for customer in customers[10:20]:
            await store.schedule(customer, Stage.METER, int(clock()) - 10, actor="tests")
            await store.schedule(customer, Stage.LEGACY, int(clock()) + 3600, actor="tests")
        many = await resolver.resolve_many(customers)
        for customer in customers:
            assert many[customer] is (await resolver.explain(customer)).stage
        assert set(many.values()) == {Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY, Stage.METER}
        await store.set_kill(True, actor="tests")
        assert set((await resolver.resolve_many(customers)).values()) == {Stage.LEGACY}

    async def test_safe_stage_when_redis_is_down(self, keys):
        """Redis unreachable: every customer gets the safe stage."""
        dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.1)
        try:
            resolver = StageResolver(dead, keys, FlagSettings())
            assert await resolver.resolve_many(["cus_a", "cus_b"]) == {
                "cus_a": Stage.LEGACY,
                "cus_b": Stage.LEGACY,
            }
        finally:
            await dead.aclose()
