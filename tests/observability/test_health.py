"""Liveness and readiness (``dualwrite.health``) on the proxy, the middleware and a worker's metrics
port: each condition that makes readiness 503, and each that only makes it ``degraded``.

Every test that stops Redis runs a ``redis-server`` of its own (``OwnRedis``); the shared Redis is
only read and written under the test's key prefix.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from dualwrite.commit import Commit
from dualwrite.config import Settings
from dualwrite.health import HEALTH_PATH, LIVE_PATH, READY_PATH, STUCK_SECONDS
from dualwrite.keys import KeySpace
from dualwrite.metrics import serve_metrics
from dualwrite.middleware import DualWriteMiddleware
from dualwrite.proxy import ProxyApp
from dualwrite.spool import Spool
from dualwrite.worker import WorkerStatus, run_worker, worker_endpoints
from tests.conftest import STRIPE_KEY, OwnRedis
from tests.middleware.test_middleware import USAGE_ROUTE
from tests.proxy.test_proxy_serve import clean_env, free_port
from tests.support import cli_environment, dualwrite_command, eventually, make_settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def down_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis of the test's own, not started yet (its URL is fixed): the test starts and stops it."""
    server = OwnRedis(tmp_path / "redis", appendonly=False)
    yield server
    server.stop()


@pytest.fixture
def own(down_redis: OwnRedis) -> OwnRedis:
    """A Redis of the test's own, started: the test may stop it."""
    down_redis.start()
    return down_redis


def own_settings(server: OwnRedis, standin_url: str, *, key: str | None = STRIPE_KEY, **sections):
    """Settings on the test's own Redis, with quick timeouts so an outage is seen at once."""
    return make_settings(
        redis_url=server.url,
        prefix="dwtest-health",
        api_base=standin_url,
        api_key=key,
        redis={"socket_timeout": 0.3, "connect_timeout": 0.3},
        **sections,
    )


@asynccontextmanager
async def proxy(settings: Settings) -> AsyncIterator[tuple[ProxyApp, httpx.AsyncClient]]:
    """The proxy, started as its lifespan starts it, and a client on it; closed after."""
    app = ProxyApp(settings)
    await app.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://proxy"
        ) as client:
            yield app, client
    finally:
        await app.aclose()


async def probe(client: httpx.AsyncClient, path: str = READY_PATH) -> tuple[int, dict[str, Any]]:
    """One probe: its status and body."""
    response = await client.get(path)
    return response.status_code, response.json()


async def until(client: httpx.AsyncClient, wanted: str, *, within: float = 15.0) -> dict[str, Any]:
    """Readiness once its ``status`` is ``wanted``; fails with the last answer after ``within``."""
    body: dict[str, Any] = {}
    try:
        with anyio.fail_after(within):
            while True:
                _, body = await probe(client)
                if body["status"] == wanted:
                    return body
                await anyio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"readiness never became {wanted!r}; last: {body}")


class TestProxy:
    """The proxy stays in rotation for what every replica shares, and leaves it for its own
    faults."""

    async def test_ready_and_live(self, own, standin_url):
        """Everything fine: live 200, ready 200 ``ready``, health ``ok`` with the outbox's oldest
        entry; the probes are never forwarded to Stripe."""
        async with proxy(own_settings(own, standin_url)) as (_, client):
            assert await probe(client, LIVE_PATH) == (200, {"status": "ok"})
            status, body = await probe(client)
            assert status == 200 and body["status"] == "ready", body
            assert body["blocking"] == [] and body["problems"] == [] and body["role"] == "proxy"
            status, health = await probe(client, HEALTH_PATH)
            assert status == 200 and health["status"] == "ok" and health["ready"] is True
            assert health["worker"] == "running" and health["stripe_key"] == "ok"
            assert health["outbox"]["oldest_age_seconds"] == 0
            assert (await client.post(READY_PATH)).status_code == 405

    async def test_redis_down_is_degraded_not_out_of_rotation(self, own, standin_url):
        """Redis stopped: readiness stays 200 (``degraded``: the proxy keeps serving usage, spooled),
        health says 503 ``unavailable``, live stays 200; Redis back: ``ready`` again."""
        async with proxy(own_settings(own, standin_url)) as (_, client):
            await until(client, "ready")
            own.stop()
            body = await until(client, "degraded")
            assert body["blocking"] == [] and "redis_unavailable" in body["problems"]
            status, health = await probe(client, HEALTH_PATH)
            assert status == 503 and health["status"] == "unavailable"
            assert health["redis"] == "unavailable" and health["ready"] is True
            assert await probe(client, LIVE_PATH) == (200, {"status": "ok"})
            own.start()
            await until(client, "ready")

    async def test_missing_stripe_key_is_not_ready(self, own, standin_url):
        """No ``STRIPE_API_KEY`` in the proxy's environment: 503 ``stripe_key_missing``."""
        async with proxy(own_settings(own, standin_url, key=None)) as (_, client):
            status, body = await probe(client)
            assert status == 503 and body["status"] == "not_ready"
            assert body["blocking"] == ["stripe_key_missing"]
            status, health = await probe(client, HEALTH_PATH)
            assert status == 200 and health["status"] == "degraded"
            assert health["stripe_key"] == "missing" and health["ready"] is False

    async def test_stopped_worker_is_not_ready(self, own, standin_url):
        """The in-process outbox worker stopped (its task ended): 503 ``worker_stopped``."""
        async with proxy(own_settings(own, standin_url)) as (app, client):
            await until(client, "ready")
            assert app.engine.worker is not None
            await app.engine.worker.aclose()
            status, body = await probe(client)
            assert status == 503 and body["blocking"] == ["worker_stopped"]
            assert (await probe(client, HEALTH_PATH))[1]["worker"] == "stopped"

    async def test_no_in_process_worker_is_ready(self, own, standin_url):
        """``run_in_process = false``: no worker is expected (``off``), and that is ready."""
        settings = own_settings(own, standin_url, outbox={"run_in_process": False})
        async with proxy(settings) as (_, client):
            assert (await probe(client))[1]["status"] == "ready"
            assert (await probe(client, HEALTH_PATH))[1]["worker"] == "off"

    async def test_shutdown_is_not_ready(self, own, standin_url):
        """Once shutdown began: 503 ``stopping``; live still answers."""
        async with proxy(own_settings(own, standin_url)) as (app, client):
            await app.aclose()
            status, body = await probe(client)
            assert status == 503 and body["blocking"] == ["stopping"]
            assert (await probe(client, LIVE_PATH))[0] == 200

    async def test_stuck_outbox_is_degraded(self, own, standin_url):
        """An outstanding entry older than ``STUCK_SECONDS``: ``outbox_stuck``, still 200."""
        settings = own_settings(own, standin_url, outbox={"run_in_process": False})
        entry = {"enqueued_at": time.time() - STUCK_SECONDS - 60}
        async with proxy(settings) as (app, client):
            shard = KeySpace(settings.redis.key_prefix, settings.redis.shards).shard(0)
            await app.engine.redis.xadd(shard.outbox, {"entry": json.dumps(entry)})
            status, body = await probe(client)
            assert status == 200 and body["status"] == "degraded"
            assert body["problems"] == ["outbox_stuck"]
            health = (await probe(client, HEALTH_PATH))[1]
            assert health["outbox"]["oldest_age_seconds"] > STUCK_SECONDS

    async def test_full_spool_is_degraded(self, down_redis, standin_url, tmp_path):
        """Redis down and the local spool full (this process refuses new usage with a retryable
        503 until Redis is back): ``spool_full``, still 200, since every replica's spool fills
        alike while Redis is away."""
        spool = Spool(tmp_path / "spool")
        for number in range(40):
            await spool.append(
                Commit(
                    prefix="dwtest-health",
                    shard=0,
                    ledger_key=f"dwtest-health:{{s0}}:ledger:2026-11-25:cus_{number}:api",
                    index_member=f"2026-11-25|cus_{number}|api",
                    index_score=20417,
                    increments={"events": 1},
                )
            )
        settings = own_settings(
            down_redis,
            standin_url,
            outbox={"spool_dir": str(spool.directory), "spool_max_bytes": 4096},
        )
        async with proxy(settings) as (_, client):
            status, body = await probe(client)
        assert status == 200 and body["blocking"] == [], body
        assert {"spool_full", "redis_unavailable"} <= set(body["problems"])

    async def test_redis_data_lost_is_degraded(self, own, standin_url):
        """Redis restarted empty under the proxy: ``redis_data_lost`` (degraded, 200)."""
        async with proxy(own_settings(own, standin_url)) as (app, client):
            own.stop()
            own.start()  # no persistence: empty
            await app.durability.check()
            status, body = await probe(client)
            assert status == 200 and "redis_data_lost" in body["problems"]
            assert body["blocking"] == []

    async def test_started_while_redis_is_down(self, down_redis, standin_url):
        """A proxy started while Redis is down runs its worker once Redis answers (it used to
        stay without one for good, and readiness would say ``worker_stopped`` forever)."""
        async with proxy(own_settings(down_redis, standin_url)) as (app, client):
            status, body = await probe(client)
            assert status == 200 and "redis_unavailable" in body["problems"], body
            assert "worker_stopped" not in body["problems"]
            down_redis.start()
            await until(client, "ready")
            worker = app.engine.worker
            assert worker is not None and worker.running

    async def test_probe_starts_the_engine_without_lifespan(self, down_redis, standin_url):
        """Served without a lifespan (the engine starts at the first usage request), on a Redis
        that does not answer: the first probe starts the engine as that request would, so the
        worker is not ``stopped`` and readiness is 200 ``degraded``."""
        app = ProxyApp(own_settings(down_redis, standin_url))
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://p"
            ) as client:
                assert (await probe(client, LIVE_PATH))[0] == 200
                status, body = await probe(client)
        finally:
            await app.aclose()
        assert status == 200 and body["status"] == "degraded", body
        assert "redis_unavailable" in body["problems"] and body["blocking"] == []


def hello_app() -> Starlette:
    """The user's app: a usage route and a page of its own."""

    async def usage(request):
        return PlainTextResponse("recorded")

    async def page(request):
        return PlainTextResponse(f"app: {request.url.path}")

    return Starlette(
        routes=[
            Route("/usage/{customer}", usage, methods=["POST"]),
            Route("/_dualwrite/ready", page),
        ]
    )


class TestMiddleware:
    """The middleware answers the probes under the app's own paths."""

    async def test_under_a_mount(self, own, standin_url):
        """Mounted under ``/api`` (Starlette runs no lifespan for a mount: the first probe
        starts the engine): ``/api/_dualwrite/ready`` is the middleware's."""
        settings = own_settings(own, standin_url, routes=(USAGE_ROUTE,))
        middleware = DualWriteMiddleware(hello_app(), config=settings)
        outer = Starlette(routes=[Mount("/api", app=middleware)])
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=outer), base_url="http://app"
            ) as client:
                assert (await client.get(f"/api{LIVE_PATH}")).json() == {"status": "ok"}
                status, body = await probe(client, f"/api{READY_PATH}")
                assert status == 200 and body["status"] == "ready", body
                assert body["role"] == "middleware"
                _, health = await probe(client, f"/api{HEALTH_PATH}")
                assert health["worker"] == "running"
                assert (await client.get(READY_PATH)).status_code == 404  # outside the mount
        finally:
            await middleware.aclose()

    def test_lifespan_shutdown_is_not_ready(self, own, standin_url):
        """Through the app's lifespan: ready while it runs; once it shut down, ``stopping``."""
        settings = own_settings(own, standin_url, routes=(USAGE_ROUTE,))
        app = DualWriteMiddleware(hello_app(), config=settings)
        with TestClient(app) as http:
            ready = http.get(READY_PATH)
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            assert not app.stopping
        assert app.stopping

    async def test_missing_key_with_usage_routes(self, own, standin_url):
        """No ``STRIPE_API_KEY`` and usage routes configured (usage is refused with 503): not
        ready. Without usage routes no key is needed: ready."""
        keyless = own_settings(own, standin_url, key=None, routes=(USAGE_ROUTE,))
        for settings, wanted in ((keyless, 503), (keyless.model_copy(update={"routes": ()}), 200)):
            app = DualWriteMiddleware(hello_app(), config=settings)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app"
            ) as client:
                status, body = await probe(client)
            await app.aclose()
            assert status == wanted, body

    async def test_redis_down_is_degraded(self, own, standin_url):
        """Redis stopped: the app stays ready (``degraded``), as the proxy does."""
        settings = own_settings(own, standin_url, routes=(USAGE_ROUTE,))
        app = DualWriteMiddleware(hello_app(), config=settings)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app"
            ) as client:
                await until(client, "ready")
                own.stop()
                body = await until(client, "degraded")
                assert body["blocking"] == [] and "redis_unavailable" in body["problems"]
        finally:
            await app.aclose()

    async def test_health_false_leaves_the_paths_to_the_app(self, own, standin_url):
        """``health=False``: the app's own ``/_dualwrite/ready`` answers."""
        settings = own_settings(own, standin_url, routes=(USAGE_ROUTE,))
        app = DualWriteMiddleware(hello_app(), config=settings, health=False)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://app"
        ) as client:
            response = await client.get(READY_PATH)
        await app.aclose()
        assert response.text == f"app: {READY_PATH}"


class TestWorker:
    """A worker process's probes, served beside ``/metrics`` (``--metrics-port``)."""

    async def test_worker_readiness(self, own, standin_url):
        """Before its worker runs: 503 ``starting``; running: 200; Redis stopped: 503
        ``redis_unavailable`` (a worker delivers nothing without it) while live stays 200; Redis
        back: 200; stopped: 503 ``stopping``."""
        settings = own_settings(own, standin_url)
        status = WorkerStatus()
        stop = asyncio.Event()
        with serve_metrics(
            settings, host="127.0.0.1", port=0, app=worker_endpoints(settings, status)
        ) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                code, body = await probe(client)
                assert code == 503 and body["blocking"] == ["starting"], body
                async with anyio.create_task_group() as group:
                    group.start_soon(lambda: run_worker(settings, stop=stop, status=status))
                    await until(client, "ready")
                    assert (await client.get("/metrics")).status_code == 200
                    own.stop()
                    body = await until(client, "not_ready")
                    assert "redis_unavailable" in body["blocking"]
                    assert (await probe(client, LIVE_PATH))[0] == 200
                    own.start()
                    await until(client, "ready")
                    stop.set()
                code, body = await probe(client)
                assert code == 503 and body["blocking"] == ["stopping"]

    async def test_worker_without_key(self, own, standin_url):
        """A worker without ``STRIPE_API_KEY`` (every shadow write would be refused): 503."""
        settings = own_settings(own, standin_url, key=None)
        status = WorkerStatus()
        stop = asyncio.Event()
        with serve_metrics(
            settings, host="127.0.0.1", port=0, app=worker_endpoints(settings, status)
        ) as port:
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
                anyio.create_task_group() as group,
            ):
                group.start_soon(lambda: run_worker(settings, stop=stop, status=status))
                await eventually(lambda: status.worker is not None, within=15, what="start")
                code, body = await probe(client)
                assert code == 503 and body["blocking"] == ["stripe_key_missing"], body
                stop.set()

    async def test_worker_command_serves_the_probes(self, redis_url, key_prefix, standin_url):
        """``dualwrite worker --metrics-port``: ready, live and ``/metrics`` on that port; SIGTERM
        stops it."""
        port = free_port()
        environment = clean_env() | cli_environment(redis_url, key_prefix, standin_url)
        process = await anyio.open_process(
            dualwrite_command("worker", "--metrics-port", str(port)), env=environment
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                with anyio.fail_after(30):
                    while True:
                        try:
                            if (await client.get(READY_PATH)).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass  # not listening yet
                        await anyio.sleep(0.1)
                assert (await client.get(LIVE_PATH)).json() == {"status": "ok"}
                health = (await client.get(HEALTH_PATH)).json()
                assert health["role"] == "worker" and health["worker"] == "running"
                assert "dualwrite_outbox_entries" in (await client.get("/metrics")).text
        finally:
            process.terminate()
            with anyio.fail_after(30):
                assert await process.wait() == 0
