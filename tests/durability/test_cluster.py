"""Redis Cluster: the same code on one server and on a real three-master cluster (started by the
tests), hash tags that keep every atomic step in one slot, and a slot moved mid-traffic."""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from redis.crc import key_slot

from dualwrite import keys as keys_module
from dualwrite.config import MeterMapping, Settings
from dualwrite.deadletters import DeadLetters
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import ConfigError
from dualwrite.flags import RedisFlagStore
from dualwrite.idempotency import claim_member
from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.models import EventPlan, Stage, UsageEvent
from dualwrite.outbox import OutboxWorker
from dualwrite.proxy import serve_proxy
from dualwrite.reconcile import ReconciliationRecord, read_reconciliation, save_records
from dualwrite.redis_client import is_cluster, open_redis, scan_keys
from dualwrite.redis_url import parse_cluster_url
from dualwrite.report import build_report
from tests.cluster_support import LocalCluster
from tests.conftest import STRIPE_KEY
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, make_settings, set_stage, usage

pytestmark = pytest.mark.anyio

SHARDS = 16


def _delete_prefix(url: str, cluster: LocalCluster | None, prefix: str) -> None:
    """Delete every key under ``prefix`` (on a cluster: on every master)."""
    if cluster is None:
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 500):
                client.unlink(*keys[start : start + 500])
        finally:
            client.close()
        return
    for port in cluster.ports:
        node = cluster.node(port)
        try:
            for key in node.scan_iter(match=f"{prefix}:*", count=1000):
                node.unlink(key)
        except redis.RedisError:
            pass  # a node mid-move; the key prefix is unique to this test anyway
        finally:
            node.close()


@pytest.fixture(params=["single", "cluster"])
def backend(request: pytest.FixtureRequest, redis_url: str) -> Iterator[tuple[str, str]]:
    """(Redis URL, key prefix): one server, then the test cluster; the prefix is cleaned after."""
    prefix = f"dwtest-{uuid.uuid4().hex[:12]}"
    cluster: LocalCluster | None = None
    url = redis_url
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        url = cluster.url
    yield url, prefix
    _delete_prefix(url, cluster, prefix)


@pytest.fixture
def cluster_prefix(redis_cluster: LocalCluster) -> Iterator[str]:
    """A key prefix of this test's own on the test cluster, cleaned afterwards."""
    prefix = f"dwtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    _delete_prefix(redis_cluster.url, redis_cluster, prefix)


def _all_names(keys: KeySpace | ShardKeys) -> list[str]:
    """Every key name ``keys`` makes, each method called with placeholder arguments."""
    names: list[str] = []
    for attribute in dir(type(keys)):
        if attribute.startswith("_") or attribute in ("prefix", "shard", "shards", "tag"):
            continue
        member = getattr(keys, attribute)
        if isinstance(member, str):
            names.append(member)
        elif callable(member):
            signature = inspect.signature(member)
            if signature.return_annotation not in ("str", str):
                continue  # not a key (shard_of, for_customer, all_shards, ...)
            placeholders = {
                name: 7 if param.annotation in ("int", int) else "x7"
                for name, param in signature.parameters.items()
            }
            names.append(member(**placeholders))
    return names


def settings_for(url: str, prefix: str, standin_url: str, **sections: Any) -> Settings:
    """Test settings on ``url`` with ``SHARDS`` shards."""
    redis_section = {"shards": SHARDS, **sections.pop("redis", {})}
    return make_settings(
        redis_url=url,
        prefix=prefix,
        api_base=standin_url,
        api_key=STRIPE_KEY,
        redis=redis_section,
        **sections,
    )


async def drain(engine: DualWriteEngine) -> None:
    """Deliver every shadow write (retries included)."""
    worker = OutboxWorker(engine.outbox, engine.writer)
    with anyio.fail_after(30):
        await worker.drain()


async def customers(builder: ScenarioBuilder, count: int) -> list[Scenario]:
    """``count`` customers on the legacy price."""
    return [await builder.customer(f"customer {n}") for n in range(count)]


class TestClusterUrl:
    """One setting reaches one server or a cluster; a malformed cluster URL is a ConfigError."""

    def test_seeds_and_credentials_are_read(self):
        """Every seed, the TLS scheme and the credentials come out of the URL."""
        address = parse_cluster_url("rediss+cluster://app:s%40cret@10.0.0.1:7000,redis-b:7001/")
        assert address.seeds == (("10.0.0.1", 7000), ("redis-b", 7001))
        assert address.tls and address.username == "app" and address.password == "s@cret"
        assert "s@cret" not in repr(address)

    @pytest.mark.parametrize(
        ("url", "hint"),
        [
            ("redis+cluster://10.0.0.1", "host:port"),
            ("redis+cluster://10.0.0.1:7000,:7001", "host:port"),
            ("redis+cluster://10.0.0.1:99999", "host:port"),
            ("redis+cluster://10.0.0.1:7000/3", "no database"),
            ("cluster://10.0.0.1:7000", "redis+cluster://"),
        ],
    )
    def test_malformed_url_is_refused(self, url, hint, monkeypatch):
        """The error names the setting and the fix, and repeats no password."""
        monkeypatch.setenv("DUALWRITE_REDIS__URL", url.replace("://", "://u:topsecret@", 1))
        with pytest.raises(ConfigError) as caught:
            Settings.load()
        message = str(caught.value)
        assert "redis.url" in message and hint in message
        assert "topsecret" not in message

    async def test_cluster_url_opens_a_cluster_client(self, redis_cluster, cluster_prefix):
        """``redis+cluster://`` gives a RedisCluster that finds every master from the seeds."""
        settings = make_settings(
            redis_url=redis_cluster.url, prefix=cluster_prefix, api_base="http://x", api_key=None
        )
        client = open_redis(settings.redis)
        try:
            assert is_cluster(client)
            await client.set(f"{cluster_prefix}:{{a}}:x", "1")
            await client.set(f"{cluster_prefix}:{{b}}:x", "2")
            await client.set(f"{cluster_prefix}:{{c}}:x", "3")
            found = await scan_keys(client, f"{cluster_prefix}:*")
            assert sorted(found) == [f"{cluster_prefix}:{{{tag}}}:x" for tag in "abc"]
        finally:
            await client.aclose()


class TestKeyLayout:
    """Hash tags: everything one atomic step touches shares a slot; the shards spread the load."""

    def test_a_shard_lives_in_one_slot(self):
        """Every key of one shard hashes to the same slot."""
        shard = KeySpace("p", shards=SHARDS).shard(3)
        names = [
            shard.outbox,
            shard.retry,
            shard.dead,
            shard.retired,
            shard.retired_moved,
            shard.divergence,
            shard.ledger_index,
            shard.ledger("2026-01", "cus_1", "ev"),
            shard.reconciliation_index,
            shard.reconciliation("2026-01", "cus_1", "ev"),
            shard.idempotency("id-1"),
            shard.late_marker("m1"),
            shard.meter_turn("cus_1", "ev"),
            shard.set_value("si_1", 7),
            f"{shard.tag}:spooled:x",
        ]
        assert len({key_slot(name.encode()) for name in names}) == 1

    def test_every_key_carries_a_hash_tag(self):
        """Each name ``KeySpace`` and ``ShardKeys`` make has a tag (the channel aside), and every
        name of a shard sits in that shard's slot: new keys are checked as they are added."""
        space = KeySpace("p", shards=SHARDS)
        shard = space.shard(5)
        shard_names = _all_names(shard)
        assert len(shard_names) >= 15
        assert {key_slot(name.encode()) for name in shard_names} == {
            key_slot(shard.outbox.encode())
        }
        for name in _all_names(space):
            assert name == space.flags_channel or re.match(r"^p:\{[^{}]+\}:", name), name

    def test_docs_table_matches_keys_module(self):
        """The documentation's key table (docs/operations/state.md) lists exactly the keys of
        ``dualwrite/keys.py``'s docstring."""
        documented = set(re.findall(r"^``(P:.+?)``", keys_module.__doc__ or "", re.M))
        page = (Path(__file__).parents[2] / "docs" / "operations" / "state.md").read_text()
        assert documented and documented == set(re.findall(r"^\| `(P:[^`]+)` \|", page, re.M))

    def test_flag_keys_share_a_slot(self):
        """The flag change script touches the flag hashes and the audit stream: one slot."""
        keys = KeySpace("p")
        names = [keys.flags_config, keys.flags_override, keys.flags_schedule, keys.flags_audit]
        assert len({key_slot(name.encode()) for name in names}) == 1

    def test_shards_spread_over_every_master(self, redis_cluster):
        """16 shards land in 16 slots, served by all three masters."""
        keys = KeySpace("dualwrite", shards=SHARDS)
        slots = {key_slot(shard.outbox.encode()) for shard in keys.all_shards()}
        owners = {redis_cluster.owner_of(shard.outbox) for shard in keys.all_shards()}
        assert len(slots) == SHARDS and owners == set(redis_cluster.ports)


class TestEndToEnd:
    """record → outbox → worker → ledger → report, on one server and on the cluster."""

    @pytest.mark.parametrize("meter_path", ["v1", "v2"])
    async def test_shadow_traffic_ends_with_exact_totals(
        self, meter_path, backend, standin_url, builder, standin
    ):
        """Shadow customers on every shard, meter events one by one (v1) or batched through the
        stream (v2): ledger == stand-in == intended, report agrees."""
        url, prefix = backend
        settings = settings_for(url, prefix, standin_url, stripe={"meter_path": meter_path})
        scenarios = await customers(builder, 12)
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        try:
            assert is_cluster(engine.redis) == url.startswith("redis+cluster")
            for scenario in scenarios:
                await set_stage(engine, scenario.customer, Stage.SHADOW)
            intended: dict[str, int] = {}
            for n, scenario in enumerate(scenarios * 3):
                outcome = await engine.record(usage(scenario, n + 1, identifier=f"e2e-{n}"))
                assert outcome.accepted and outcome.shadow_status == "enqueued"
                intended[scenario.customer] = intended.get(scenario.customer, 0) + n + 1
            await drain(engine)
            report = await build_report(engine.ledger, engine.resolver, outbox=engine.outbox)
            lines = {line.customer: line for line in report.customers}
            for scenario in scenarios:
                total = intended[scenario.customer]
                assert standin.legacy_total(scenario.item) == total
                assert standin.meter_total(scenario.customer, EVENT_NAME) == total
                line = lines[scenario.customer]
                assert line.legacy.accepted_qty == line.meter.accepted_qty == total
            depth = await engine.outbox.depth()
            assert depth.outstanding == 0 and depth.pending == 0 and depth.dead == 0
        finally:
            await engine.aclose()
        stream_calls = [r for r in standin.requests if r.path == "/v2/billing/meter_event_stream"]
        assert bool(stream_calls) == (meter_path == "v2")

    async def test_flag_change_reaches_another_instance(self, backend, standin_url, builder):
        """A change made through one engine applies to the other's next lookup (pub/sub)."""
        url, prefix = backend
        settings = settings_for(url, prefix, standin_url, flags={"cache_ttl": 600})
        scenario = await builder.customer()
        async with (
            DualWriteEngine.from_settings(settings) as first,
            DualWriteEngine.from_settings(settings) as second,
        ):
            assert await second.resolver.resolve(scenario.customer) is Stage.LEGACY
            store = RedisFlagStore(first.redis, first.keys)
            await store.set_override(scenario.customer, Stage.SHADOW, actor="tests")
            with anyio.fail_after(2):
                while True:  # polls: the point is how soon the other cache lets the change through
                    if await second.resolver.resolve(scenario.customer) is Stage.SHADOW:
                        break
                    await anyio.sleep(0.005)

    async def test_proxy_and_its_worker_deliver(self, backend, standin_url, builder, standin):
        """Usage records through the proxy: legacy now, meter events by the proxy's own worker."""
        url, prefix = backend
        scenarios = await customers(builder, 4)
        meter = MeterMapping(event_name=EVENT_NAME, legacy_prices=(scenarios[0].legacy_price,))
        settings = settings_for(url, prefix, standin_url).model_copy(update={"meters": (meter,)})
        engine = DualWriteEngine.from_settings(settings)
        for scenario in scenarios:
            await set_stage(engine, scenario.customer, Stage.SHADOW)
        await engine.aclose()
        headers = {"Authorization": f"Bearer {STRIPE_KEY}"}
        with serve_proxy(settings) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, headers=headers) as http:
                for n, scenario in enumerate(scenarios * 2):
                    path = f"/v1/subscription_items/{scenario.item}/usage_records"
                    response = await http.post(
                        path,
                        data={"quantity": str(n + 1)},
                        headers={"Idempotency-Key": f"proxy-{n}"},
                    )
                    assert response.status_code == 200, response.text
            with anyio.fail_after(20):
                while True:  # the proxy's worker runs in its own thread
                    if all(
                        standin.meter_total(s.customer, EVENT_NAME) == standin.legacy_total(s.item)
                        for s in scenarios
                    ):
                        break
                    await anyio.sleep(0.02)
        for n, scenario in enumerate(scenarios):
            assert standin.legacy_total(scenario.item) == (n + 1) + (n + 5)


class TestFailurePaths:
    """Refusals, divergence, dead letters and their replay: the same scripts on both backends."""

    async def test_refusals_dead_letters_and_replay(self, backend, standin_url, builder, standin):
        """A refused usage record is counted; a refused meter event is dead-lettered as
        divergence, then replayed into the outbox and delivered once the fault is gone."""
        url, prefix = backend
        settings = settings_for(url, prefix, standin_url)
        refused, diverging = await customers(builder, 2)
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        try:
            for scenario in (refused, diverging):
                await set_stage(engine, scenario.customer, Stage.SHADOW)
            standin.faults.refuse(
                path=r"/v1/subscription_items/.*/usage_records",
                status=400,
                code="parameter_invalid",
            )
            outcome = await engine.record(usage(refused, 8, identifier="refused-1"))
            assert not outcome.accepted
            standin.faults.clear()
            standin.faults.refuse(path=r"/v1/billing/meter_events", status=400, code="x")
            assert (await engine.record(usage(diverging, 3, identifier="diverge-1"))).accepted
            await drain(engine)
            [record] = await engine.ledger.divergences(customer=diverging.customer)
            assert record.kind == "shadow_refused"
            letters = DeadLetters(engine.redis, engine.keys)
            [letter] = await letters.find(customer=diverging.customer)
            standin.faults.clear()
            assert len(await letters.retry([letter.id])) == 1
            await drain(engine)
            totals: dict[str, dict[str, int]] = {}
            for row in await engine.ledger.rows():
                into = totals.setdefault(row.customer, {})
                for name, value in row.counters.items():
                    into[name] = into.get(name, 0) + value
            depth = await engine.outbox.depth()
        finally:
            await engine.aclose()
        assert totals[refused.customer]["legacy_refused_events"] == 1
        assert standin.legacy_total(refused.item) == 0
        assert standin.meter_total(diverging.customer, EVENT_NAME) == 3
        assert totals[diverging.customer]["meter_accepted_qty"] == 3
        assert depth.dead == 0 and depth.outstanding == 0

    async def test_reconciliation_records_round_trip(self, backend, standin_url):
        """Reconciliation records of customers on every shard are saved (one MULTI per shard) and
        read back; saving again replaces them."""
        url, prefix = backend
        engine = DualWriteEngine.from_settings(settings_for(url, prefix, standin_url))
        records = [
            ReconciliationRecord(
                customer=f"cus_recon{n}",
                event_name=EVENT_NAME,
                period="2026-01-05",
                checked_at=1_767_600_000.0,
                intended_qty=n,
            )
            for n in range(12)
        ]
        try:
            await save_records(engine.redis, engine.keys, records)
            await save_records(engine.redis, engine.keys, records)
            stored = await read_reconciliation(engine.redis, engine.keys)
        finally:
            await engine.aclose()
        assert len({engine.keys.shard_of(r.customer) for r in records}) > 1
        assert sorted(stored, key=lambda r: r.intended_qty) == records

    async def test_resent_claim_finds_its_own_claim(self, backend, standin_url):
        """redis-py resends a script whose reply was lost (timeout, failover): the second run of
        an identifier claim sees its own claim, while another request's claim stays busy."""
        url, prefix = backend
        engine = DualWriteEngine.from_settings(settings_for(url, prefix, standin_url))
        event = UsageEvent(
            identifier="resent-1",
            identifier_source="idempotency_key",
            customer="cus_resent",
            subscription_item="si_resent",
            event_name=EVENT_NAME,
            quantity=1,
            timestamp=1_700_000_000,
        )
        shard = engine.keys.for_customer(event.customer)
        keys = [shard.idempotency(event.identifier), shard.set_value("si_resent", 1), shard.claims]
        fingerprint, event_json = event.fingerprint(), event.model_dump_json()
        plan = EventPlan.at(Stage.SHADOW).model_dump_json()
        member = claim_member(event)
        args: list[str | int] = [
            fingerprint,
            100,
            60,
            600,
            "",
            event_json,
            "token-a",
            plan,
            member,
            60,
        ]
        try:
            script = engine.idempotency._claim
            first = await script(keys=keys, args=args)
            resent = await script(keys=keys, args=args)
            other = await script(keys=keys, args=[*args[:6], "token-b", *args[7:]])
        finally:
            await engine.aclose()
        assert first[0] == resent[0] == "new" and other[0] == "busy"

    async def test_script_cache_flushed_on_every_node(
        self, redis_cluster: LocalCluster, cluster_prefix, standin_url, builder, standin
    ):
        """After SCRIPT FLUSH on every master (a restarted or new node), scripts are loaded again
        (NOSCRIPT → SCRIPT LOAD → EVALSHA) and the event is recorded and delivered once."""
        settings = settings_for(redis_cluster.url, cluster_prefix, standin_url)
        scenario = (await customers(builder, 1))[0]
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        try:
            await set_stage(engine, scenario.customer, Stage.SHADOW)
            assert (await engine.record(usage(scenario, 2, identifier="flush-1"))).accepted
            for port in redis_cluster.ports:
                node = redis_cluster.node(port)
                try:
                    node.script_flush()
                finally:
                    node.close()
            assert (await engine.record(usage(scenario, 3, identifier="flush-2"))).accepted
            await drain(engine)
        finally:
            await engine.aclose()
        assert standin.legacy_total(scenario.item) == 5
        assert standin.meter_total(scenario.customer, EVENT_NAME) == 5


class TestDelivery:
    """Workers share the outbox through per-shard consumer groups; no slot carries all of it."""

    async def test_two_workers_share_every_shard(self, backend, standin_url, builder, standin):
        """Entries spread over the shards' streams; two consumers each deliver part, none twice."""
        url, prefix = backend
        # Small reads, so that one worker cannot take everything in one round.
        settings = settings_for(
            url, prefix, standin_url, redis={"shards": 4}, outbox={"batch_size": 2}
        )
        scenarios = await customers(builder, 16)
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        try:
            for scenario in scenarios:
                await set_stage(engine, scenario.customer, Stage.SHADOW)
            for n, scenario in enumerate(scenarios * 2):
                await engine.record(usage(scenario, 1, identifier=f"share-{n}"))
            lengths = [await engine.redis.xlen(shard.outbox) for shard in engine.keys.all_shards()]
            assert sum(lengths) == 32 and max(lengths) < 32 and sum(map(bool, lengths)) >= 2
            first = OutboxWorker(engine.outbox, engine.writer, consumer="machine-a")
            second = OutboxWorker(engine.outbox, engine.writer, consumer="machine-b")
            with anyio.fail_after(20):
                while True:  # alternate rounds, as two machines reading at once would
                    if (await engine.outbox.depth()).outstanding == 0:
                        break
                    await first.run_once()
                    await second.run_once()
            assert first.counts["accepted"] > 0 and second.counts["accepted"] > 0
            assert first.counts["accepted"] + second.counts["accepted"] == 32
        finally:
            await engine.aclose()
        for scenario in scenarios:
            assert standin.meter_total(scenario.customer, EVENT_NAME) == 2


class TestTopologyChange:
    """A slot moving between masters mid-traffic loses and doubles nothing."""

    @pytest.mark.parametrize(
        "change", ["slot-move", pytest.param("failover", marks=pytest.mark.slow)]
    )
    async def test_topology_change_during_traffic_keeps_exact_totals(
        self, change, redis_cluster: LocalCluster, cluster_prefix, standin_url, builder, standin
    ):
        """Shadow traffic and a running worker while a busy shard's slot moves to another master,
        or while its master fails over to a new replica: ledger == stand-in == intended, nothing
        dead-lettered, the outbox empty."""
        settings = settings_for(redis_cluster.url, cluster_prefix, standin_url, redis={"shards": 4})
        scenarios = await customers(builder, 8)
        keys = KeySpace(cluster_prefix, shards=4)
        busiest = max(
            range(4),
            key=lambda shard: sum(keys.shard_of(s.customer) == shard for s in scenarios),
        )
        moving = keys.shard(busiest).outbox
        replica = None
        if change == "failover":
            replica = await anyio.to_thread.run_sync(
                lambda: redis_cluster.add_replica(redis_cluster.owner_of(moving))
            )
        intended: dict[str, int] = {}
        state = {"moving": 0, "during_move": 0}
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=True)
        try:
            for scenario in scenarios:
                await set_stage(engine, scenario.customer, Stage.SHADOW)

            async def traffic(lane: int) -> None:
                for n in range(30):
                    scenario = scenarios[(lane + n) % len(scenarios)]
                    quantity = lane * 100 + n + 1
                    outcome = await engine.record(
                        usage(scenario, quantity, identifier=f"move-{lane}-{n}")
                    )
                    assert outcome.accepted, outcome
                    intended[scenario.customer] = intended.get(scenario.customer, 0) + quantity
                    state["during_move"] += state["moving"]

            def move() -> tuple[int, int]:
                state["moving"] = 1
                try:
                    if replica is None:
                        return redis_cluster.migrate_slot_of(moving, batch=2)
                    before = redis_cluster.owner_of(moving)
                    redis_cluster.fail_over_to(replica)
                    return before, replica
                finally:
                    state["moving"] = 0

            async with anyio.create_task_group() as group:
                for lane in range(4):
                    group.start_soon(traffic, lane)
                await anyio.sleep(0.2)
                before, after = await anyio.to_thread.run_sync(move)
            assert redis_cluster.owner_of(moving) == after != before
            assert state["during_move"] > 0  # the slot really moved under traffic
            await drain(engine)
        finally:
            await engine.aclose()
        engine = DualWriteEngine.from_settings(settings)
        await engine.start(worker=False)
        try:
            await drain(engine)
            report = await build_report(engine.ledger, engine.resolver, outbox=engine.outbox)
            depth = await engine.outbox.depth()
        finally:
            await engine.aclose()
        lines = {line.customer: line for line in report.customers}
        assert depth.outstanding == 0 and depth.pending == 0 and depth.dead == 0
        assert sum(intended.values()) == sum(lane * 100 * 30 + 465 for lane in range(4))
        for scenario in scenarios:
            total = intended[scenario.customer]
            assert standin.legacy_total(scenario.item) == total
            assert standin.meter_total(scenario.customer, EVENT_NAME) == total
            line = lines[scenario.customer]
            assert line.legacy.accepted_qty == line.meter.accepted_qty == total
