"""Resource bounds: every Redis stream that only grows is capped, every key that grows with traffic
expires, and every in-process buffer is bounded, with back-pressure (never loss) when full."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

import dualwrite
import dualwrite.outbox._store
import dualwrite.periods
from dualwrite.commit import Commit
from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore, StageResolver
from dualwrite.keys import KeySpace
from dualwrite.ledger import LedgerUpdate
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.models import Leg, Stage, UsageEvent
from dualwrite.periods import ItemPeriods
from tests.conftest import STRIPE_KEY
from tests.routes.test_fuzz_routes import usage_app
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder, make_settings, set_stage, usage

pytestmark = pytest.mark.anyio

PACKAGE = Path(dualwrite.__file__).parent
#: Streams that hold work, not history: entries leave them when settled (XDEL), so a cap would
#: drop undelivered usage. Their size is the outstanding work (``dualwrite health``, the report).
WORK_STREAM_XADDS = {
    "ledger/_commit.py": 1,  # the shadow write joins the outbox
    "outbox/_store.py": 1,  # a retry whose backoff is over rejoins the outbox
    "deadletters.py": 1,  # `dualwrite dead retry` puts a dead letter back in the outbox
}
#: Key kinds that do not expire: configuration, capped streams, work queues, and the ledger (one
#: hash per customer, meter and period, plus its indexes and rollups).
PERSISTENT = re.compile(
    r":\{flags\}:|:(outbox|retry|dead|divergence)$|-index$"
    r"|:ledger:|:rollup:|:recon:|:recon-rollup:|-ready$|:\{ops\}:audit$"
    r"|:\{rl\}:backpressure$|:\{items\}:unmapped$"
    # The guard's changed set (emptied every pass) and its row list (one field per customer).
    r"|:guard-changed$|:customer-rows$"
)


class TestRedisCaps:
    """Streams that only grow are capped; everything that grows with traffic expires."""

    def test_every_history_xadd_has_maxlen(self):
        """Each XADD in the package carries MAXLEN, except those onto the outbox (work)."""
        uncapped: dict[str, int] = {}
        for path in PACKAGE.rglob("*.py"):
            relative = path.relative_to(PACKAGE).as_posix()
            if relative.startswith("testing/"):
                continue  # the Stripe stand-in, not dualwrite's state
            lines = path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines):
                if not re.search(r"'XADD'|\.xadd\(", line):
                    continue
                call = " ".join(lines[number : number + 6])
                if "MAXLEN" not in call and "maxlen=" not in call:
                    uncapped[relative] = uncapped.get(relative, 0) + 1
        assert uncapped == WORK_STREAM_XADDS

    async def test_divergence_log_is_capped(self, standin_settings):
        """400 divergent commits into a log capped at 100: about 100 remain (approximate trim)."""
        settings = standin_settings(ledger={"divergence_maxlen": 100})
        engine = DualWriteEngine.from_settings(settings)
        shard = engine.keys.for_customer("cus_cap")
        for index in range(400):
            event = UsageEvent(
                identifier=f"cap-{index}",
                customer="cus_cap",
                event_name=EVENT_NAME,
                quantity=1,
                timestamp=int(time.time()),
            )
            update = LedgerUpdate(shard, event).recorded(
                Stage.METER, Leg.METER, None, 1, translated=True
            )
            divergence = {"kind": "translated", "identifier": event.identifier}
            await engine.commits.apply(Commit.of_update(update, divergence=divergence))
        length = await engine.redis.xlen(shard.divergence)
        await engine.aclose()
        assert 100 <= length <= 200  # MAXLEN ~ trims whole stream nodes (100 entries each)

    async def test_dead_letters_are_capped(self, engine, monkeypatch):
        """Unreadable entries moved to the dead letters respect the cap too."""
        monkeypatch.setattr(dualwrite.outbox._store, "DEAD_MAXLEN", 10)
        shard = engine.keys.shard(0)
        for index in range(300):
            await engine.outbox.dead_letter_raw(
                shard, f"{index + 1}-0", "not json", reason="unreadable", at=time.time()
            )
        assert 10 <= await engine.redis.xlen(shard.dead) <= 110

    async def test_flag_audit_is_capped(self, redis_client, key_prefix):
        """The audit stream keeps about ``audit_maxlen`` changes."""
        store = RedisFlagStore(redis_client, KeySpace(key_prefix), audit_maxlen=10)
        for index in range(250):
            await store.set_override(f"cus_{index}", Stage.SHADOW, actor="t", reason="cap")
        assert 10 <= await redis_client.xlen(KeySpace(key_prefix).flags_audit) <= 110

    async def test_keys_growing_with_traffic_expire(self, engine, standin_url, key_prefix):
        """After traffic at every stage (keys, sets, meter events), each key is either of a
        bounded kind or has a TTL."""
        builder = ScenarioBuilder(standin_url, STRIPE_KEY)
        for stage in Stage:
            scenario = await builder.customer(stage.value)
            await set_stage(engine, scenario.customer, stage)
            await engine.record(usage(scenario, 3, identifier=f"key-{stage.value}"))
            await engine.record(usage(scenario, 2, action="set", identifier=f"set-{stage.value}"))
        await builder.aclose()
        unbounded = []
        async for key in engine.redis.scan_iter(match=f"{key_prefix}:*", count=10_000):
            if PERSISTENT.search(key):
                continue
            if await engine.redis.ttl(key) <= 0:
                unbounded.append(key)
        assert unbounded == []
        kinds = {
            key.split(":")[2]
            async for key in engine.redis.scan_iter(match=f"{key_prefix}:*", count=10_000)
        }
        assert {"idem", "set"} <= kinds  # the expiring kinds were exercised


def spool_files(directory: Path) -> list[tuple[str, int]]:
    """The spool's files and their sizes."""
    return sorted((path.name, path.stat().st_size) for path in directory.iterdir())


def empty_spool(directory: Path) -> None:
    """Remove every spool file."""
    for path in directory.iterdir():
        path.unlink()


async def scenario_on(url: str) -> Scenario:
    """A customer with a legacy metered item on the stand-in at ``url``."""
    async with ScenarioBuilder(url, STRIPE_KEY) as builder:
        return await builder.customer()


async def post_usage(settings: Settings, scenario: Scenario, quantity: int) -> httpx.Response:
    """One usage request through the middleware (on ``settings``) for the scenario's item."""
    app = DualWriteMiddleware(usage_app(), config=settings)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://a"
        ) as client:
            return await client.post(
                f"/usage/{scenario.customer}",
                json={"item": scenario.item, "usage": {"quantity": quantity}},
            )
    finally:
        await app.aclose()


class TestInProcessBounds:
    """In-process buffers are bounded; a full spool holds callers back instead of losing usage."""

    @pytest.fixture
    def down_settings(self, tmp_path: Path, standin_url: str) -> Settings:
        """Redis unreachable, a 4 KiB spool that already holds 5 KiB from earlier outages."""
        spool = tmp_path / "spool"
        spool.mkdir()
        (spool / "spool-earlier-1-abc.jsonl").write_bytes(b"\n" * 5000)
        return make_settings(
            redis_url="redis://127.0.0.1:1/0",
            prefix="dwtest-spoolfull",
            api_base=standin_url,
            api_key=STRIPE_KEY,
            redis={"connect_timeout": 0.2, "socket_timeout": 0.2},
            outbox={"spool_dir": str(spool), "spool_max_bytes": 4096, "run_in_process": False},
            routes=(
                {
                    "method": "POST",
                    "path": "/usage/{customer}",
                    "customer": "path:customer",
                    "subscription_item": "json:item",
                    "quantity": "json:usage.quantity",
                    "event_name": f"const:{EVENT_NAME}",
                },
            ),
        )

    async def test_full_spool_is_back_pressure(self, down_settings, standin, standin_url):
        """A full spool: a retryable 503 before any write (Stripe untouched, the spool unchanged)."""
        spool_dir = Path(str(down_settings.outbox.spool_dir))
        before = spool_files(spool_dir)
        scenario = await scenario_on(standin_url)
        standin.reset_requests()
        response = await post_usage(down_settings, scenario, 4)
        assert response.status_code == 503
        assert response.headers["Stripe-Should-Retry"] == "true"
        # When to retry: once the spool has had a replay to drain.
        replay = down_settings.outbox.spool_replay_seconds
        assert response.headers["Retry-After"] == f"{replay:g}"
        assert response.json()["error"]["type"] == "api_error"
        assert [r for r in standin.requests if r.method == "POST"] == []
        assert spool_files(spool_dir) == before

    async def test_spool_below_cap_accepts(self, down_settings, standin, standin_url):
        """Below the cap the same request is written to Stripe and spooled (delayed, not lost)."""
        spool_dir = Path(str(down_settings.outbox.spool_dir))
        empty_spool(spool_dir)
        scenario = await scenario_on(standin_url)
        response = await post_usage(down_settings, scenario, 4)
        assert response.status_code == 200, response.text
        assert standin.legacy_total(scenario.item) == 4
        assert sum(size for _, size in spool_files(spool_dir)) > 0

    async def test_stage_cache_is_bounded(self, engine):
        """The stage resolver's cache never holds more than ``max_entries`` customers."""
        resolver = StageResolver(engine.redis, engine.keys, engine.settings.flags, max_entries=10)
        for index in range(60):
            await resolver.resolve(f"cus_{index}")
        assert len(resolver._cache) <= 10

    async def test_period_cache_is_bounded(self, engine, monkeypatch):
        """The in-memory copies of items' billing periods stay under their cap."""
        monkeypatch.setattr(dualwrite.periods, "LOCAL_PERIODS_MAX", 5)
        periods = ItemPeriods(start=1, end=int(time.time()) + 86400, interval="month")
        for index in range(40):
            await engine.periods.remember(f"si_{index}", periods)
        assert len(engine.periods._local) <= 5


class TestSpoolAndRetry:
    """Found by the soak: a spooled commit and the caller's retry of the same request count once."""

    async def test_retry_while_spooled_counts_once(
        self, tmp_path, key_prefix, standin, standin_url, standin_settings
    ):
        """Redis down: Stripe accepts, the commit is spooled; the caller retries (Redis back) and
        is recorded; the later replay of the spool then adds nothing."""
        spool = str(tmp_path / "spool")
        scenario = await scenario_on(standin_url)
        event = usage(scenario, 4, identifier="retry-while-spooled", timestamp=int(time.time()))
        down = DualWriteEngine.from_settings(
            make_settings(
                redis_url="redis://127.0.0.1:1/0",
                prefix=key_prefix,
                api_base=standin_url,
                api_key=STRIPE_KEY,
                redis={"connect_timeout": 0.2, "socket_timeout": 0.2},
                outbox={"spool_dir": spool},
            )
        )
        first = await down.record(event)
        await down.aclose()
        assert first.accepted and spool_files(Path(spool))
        up = DualWriteEngine.from_settings(standin_settings(outbox={"spool_dir": spool}))
        retry = await up.record(event)  # Stripe replays its first answer under the same key
        assert retry.accepted
        assert up.spool is not None
        replayed = await up.spool.replay(up.commits)
        rows = await up.ledger.rows(customer=scenario.customer)
        await up.aclose()
        assert replayed == 0
        assert sum(row["quantity"] for row in rows) == 4
        assert sum(row["legacy_accepted_qty"] for row in rows) == 4
        assert standin.legacy_total(scenario.item) == 4
