"""What a usage request costs through ``DualWriteMiddleware``: ``shadow`` against ``legacy``, and
both against what an app would otherwise do, in one run.

The Stripe stand-in runs in its own process and answers every call after ``--latency-ms`` (30 ms by
default, a typical Stripe API call). Four uvicorn processes serve the same ``POST /usage/{customer}``
route (JSON body ``{"item": "si_…", "quantity": 1}``):

* ``single``: the app's own usage-record call in the handler (the SDK, one Stripe call): the
  baseline;
* ``naive``: an in-handler dual write, the usage record then the meter event, in sequence;
* ``legacy``: the handler does nothing, ``DualWriteMiddleware`` writes the usage record
  (customer pinned to ``legacy``; the ledger is updated in Redis);
* ``shadow``: the same with the customer at ``shadow``: the meter event goes to the outbox in the
  same Redis transaction, and the in-process worker delivers it off the request path;
* ``shadow_ext``: ``shadow`` with the in-process worker off (``[outbox] run_in_process = false``,
  deliveries left to ``dualwrite worker`` processes elsewhere): the request path alone;
* ``legacy_rl``: ``legacy`` with the legacy rate limit on, as it is by default (its token is one
  GCRA script per usage record, sent in the claim's round trip; here 1,000/s with a 0.01 s burst,
  so that the token costs what it does at Stripe's 100/s without throttling the benchmark).

Targets: ``legacy`` answers within 1.02x the app's own call (p50), and ``shadow`` adds at most
one Redis round trip to ``legacy`` (flags from the local cache).
The script counts the Redis commands one usage request sends at each stage (``MONITOR``, the engine
alone), and compares the latency of ``shadow_ext`` (the request path; ``shadow`` also pays for the
deliveries made in the same process and event loop) with a Redis PING measured in the same run.
Requests carry no Idempotency-Key, so identifiers are minted; with one, both stages add the same
claim round trip.
Rate limits are off (``[limits]`` 0) so that Stripe's quotas do not shape a latency benchmark,
except in ``legacy_rl``. ``--modes`` runs a subset (``single`` is always run: the baseline).

    python bench/usage_routes.py                   # 5 runs x 3 s, concurrency 1 and 8
    python bench/usage_routes.py --latency-ms 0 --concurrency 1

Needs Redis (``REDIS_URL``); its keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from _load import (
    REDIS_URL,
    WARMUP_SECONDS,
    child,
    cleanup,
    cpu_seconds,
    free_port,
    http_request,
    measure,
    summary,
)
from _scenario import EVENT_NAME, KEY, LEGACY_VERSION, USAGE_ROUTE, Catalog, run_standin

MODES = ("single", "naive", "legacy", "shadow", "shadow_ext", "legacy_rl")
WRAPPED = ("legacy", "shadow", "shadow_ext", "legacy_rl")
#: The issue's goal: a usage request at ``legacy`` costs at most this much the app's own call (p50).
LEGACY_TARGET = 1.02


def _settings(prefix: str, upstream: str, *, worker: bool, limited: bool = False) -> Any:
    from dualwrite import Settings

    legacy_limit = {"legacy_per_second": 1000, "burst_seconds": 0.01} if limited else {}
    return Settings(
        redis={"url": REDIS_URL, "key_prefix": prefix},
        stripe={"api_base": upstream},
        limits={
            "legacy_per_second": 0,
            "meter_per_second": 0,
            "stream_events_per_second": 0,
            **legacy_limit,
        },
        outbox={"spool": False, "run_in_process": worker},
        routes=[USAGE_ROUTE],
        meters=[{"event_name": EVENT_NAME}],
    )


def build_app(mode: str, prefix: str, upstream: str) -> Any:
    """The app for ``mode``."""
    import stripe
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from dualwrite import DualWriteMiddleware
    from dualwrite.stripe_io._http import PooledAIOHTTPClient

    # The naive app uses the same SDK and HTTP client as dualwrite's writer, so that only the
    # design differs.
    http_client = PooledAIOHTTPClient(timeout=20, max_connections=200, verify_tls=False)
    client = stripe.StripeClient(
        KEY, base_addresses={"api": upstream}, http_client=http_client, max_network_retries=0
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await http_client.close_async()

    async def usage(request: Request) -> JSONResponse:
        if mode in WRAPPED:
            outcome = request.state.dualwrite
            return JSONResponse({"recorded": outcome.accepted})
        body = json.loads(await request.body())
        customer, now = request.path_params["customer"], int(time.time())
        record = await client.raw_request_async(
            "post",
            f"/v1/subscription_items/{body['item']}/usage_records",
            quantity=body["quantity"],
            timestamp=now,
            action="increment",
            stripe_version=LEGACY_VERSION,
        )
        if mode == "naive":
            await client.v1.billing.meter_events.create_async(
                {
                    "event_name": EVENT_NAME,
                    "payload": {"stripe_customer_id": customer, "value": str(body["quantity"])},
                    "identifier": uuid.uuid4().hex,
                    "timestamp": now,
                }
            )
        return JSONResponse({"recorded": record.code == 200})

    app = Starlette(routes=[Route("/usage/{customer}", usage, methods=["POST"])], lifespan=lifespan)
    if mode in WRAPPED:
        settings = _settings(
            prefix, upstream, worker=mode != "shadow_ext", limited=mode == "legacy_rl"
        )
        return DualWriteMiddleware(app, config=settings)
    return app


def serve(port: int, mode: str, prefix: str, upstream: str) -> None:
    """Child: uvicorn serving the app for ``mode``, quiet."""
    import uvicorn

    uvicorn.run(
        build_app(mode, prefix, upstream),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        server_header=False,
        date_header=False,
    )


async def _pin(prefix: str, stages: dict[str, str]) -> None:
    import redis.asyncio as aioredis

    from dualwrite.flags import RedisFlagStore
    from dualwrite.keys import KeySpace
    from dualwrite.models import Stage

    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        store = RedisFlagStore(redis, KeySpace(prefix))
        for customer, stage in stages.items():
            await store.set_override(customer, Stage(stage), actor="bench")
    finally:
        await redis.aclose()


async def _commands_per_record(
    prefix: str, upstream: str, scenario: dict[str, tuple[str, str]]
) -> dict[str, float]:
    """Redis commands a usage request sends, per stage, seen by MONITOR (commands run inside Lua
    scripts not counted): the engine alone, no worker, 50 records per stage."""
    import redis.asyncio as aioredis
    from pydantic import SecretStr

    from dualwrite.engine import DualWriteEngine
    from dualwrite.models import UsageEvent

    watcher = aioredis.Redis.from_url(REDIS_URL)
    counts: dict[str, float] = {}
    try:
        for mode in ("legacy", "shadow_ext", "legacy_rl"):
            customer, item = scenario[mode]
            settings = _settings(prefix, upstream, worker=False, limited=mode == "legacy_rl")
            settings = settings.model_copy(update={"stripe_api_key": SecretStr(KEY)})
            engine = DualWriteEngine.from_settings(settings)
            await engine.start(worker=False)

            def event(customer: str = customer, item: str = item) -> UsageEvent:
                return UsageEvent(
                    identifier=uuid.uuid4().hex,
                    customer=customer,
                    subscription_item=item,
                    event_name=EVENT_NAME,
                    quantity=1,
                    timestamp=int(time.time()),
                )

            try:
                for _ in range(5):  # warm: cached stage, item period
                    if not (await engine.record(event())).accepted:
                        raise SystemExit(f"{mode}: the stand-in refused a usage record")
                seen = 0
                async with watcher.monitor() as monitor:
                    marker = f"dwbench-marker-{uuid.uuid4().hex}"
                    records = 50
                    for _ in range(records):
                        await engine.record(event())
                    await watcher.get(marker)
                    while True:
                        command = await monitor.next_command()
                        text = command["command"]
                        if marker in text:
                            break
                        if prefix in text and command.get("client_type") != "lua":
                            seen += 1
                counts[mode] = seen / records
            finally:
                await engine.aclose()
    finally:
        await watcher.aclose()
    return counts


def redis_round_trip_ms(count: int = 2000) -> float:
    """The median PING round trip through redis-py's asyncio client (the engine's), in ms."""
    import redis.asyncio as aioredis

    async def pings() -> list[float]:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await client.ping()
            times = []
            for _ in range(count):
                started = time.perf_counter()
                await client.ping()
                times.append((time.perf_counter() - started) * 1000)
        finally:
            await client.aclose()
        return times

    return statistics.median(asyncio.run(pings()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="stand-in delay per reply")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    options = parser.parse_args()
    levels = [int(level) for level in options.concurrency.split(",")]
    modes = tuple(mode for mode in MODES if mode == "single" or mode in options.modes.split(","))

    env = dict(os.environ, STRIPE_API_KEY=KEY)
    prefix = f"dwbench-{uuid.uuid4().hex[:8]}"
    standin_port = free_port()
    upstream = f"http://127.0.0.1:{standin_port}"
    ports = {mode: free_port() for mode in MODES}
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    pings: list[float] = []
    try:
        with child(
            [__file__, "_standin", str(standin_port), str(options.latency_ms / 1000)],
            what="stand-in",
            env=env,
            port=standin_port,
        ):
            catalog = Catalog(upstream)
            scenario = {mode: catalog.customer(mode) for mode in MODES}
            stages = {
                "legacy": "legacy",
                "shadow": "shadow",
                "shadow_ext": "shadow",
                "legacy_rl": "legacy",
            }
            asyncio.run(_pin(prefix, {scenario[m][0]: stage for m, stage in stages.items()}))
            commands = asyncio.run(_commands_per_record(prefix, upstream, scenario))
            servers = [
                child(
                    [__file__, "_serve", str(ports[mode]), mode, prefix, upstream],
                    what=f"{mode} app",
                    env=env,
                    port=ports[mode],
                )
                for mode in modes
            ]
            pids = {
                mode: server.__enter__().pid for mode, server in zip(modes, servers, strict=True)
            }
            try:
                for level in levels:
                    results[level] = {mode: [] for mode in modes}
                    for run in range(options.runs):
                        pings.append(redis_round_trip_ms())
                        order = modes if run % 2 == 0 else modes[::-1]
                        for mode in order:
                            url = f"http://127.0.0.1:{ports[mode]}"
                            customer, item = scenario[mode]
                            request = http_request(
                                "POST",
                                url,
                                f"/usage/{customer}",
                                headers=[("Content-Type", "application/json")],
                                body=json.dumps({"item": item, "quantity": 1}).encode(),
                            )
                            before = cpu_seconds(pids[mode])
                            result = measure(
                                url, request, seconds=options.seconds, concurrency=level
                            )
                            # The server's CPU over every request of the run (warm-up included).
                            sent = result["requests"] * (1 + WARMUP_SECONDS / options.seconds)
                            used = cpu_seconds(pids[mode]) - before
                            result["cpu_ms"] = used / max(sent, 1) * 1000
                            results[level][mode].append(result)
            finally:
                for server in reversed(servers):
                    server.__exit__(None, None, None)
    finally:
        cleanup(prefix)

    ping = statistics.median(pings)
    print(
        f"POST /usage/{{customer}}, {options.runs} runs x {options.seconds:g} s per app, stand-in "
        f"latency {options.latency_ms:g} ms, Redis PING round trip {ping:.3f} ms (median), "
        f"{os.cpu_count()} CPUs shared by everything"
    )
    added_commands = commands["shadow_ext"] - commands["legacy"]
    print(
        f"Redis commands per usage request (MONITOR, engine alone): legacy "
        f"{commands['legacy']:.2f}, shadow {commands['shadow_ext']:.2f}: shadow adds "
        f"{added_commands:+.2f} (target <= 1 round trip: "
        f"{'meets' if added_commands <= 1 else 'MISSES'} it); legacy with its rate limit "
        f"{commands['legacy_rl']:.2f} (the token's script is sent with the claim: one round trip)"
    )
    for level, by_mode in results.items():
        print(
            f"\nconcurrency {level:<4}  req/s            p50 ms               p99 ms"
            "               server CPU ms/request"
        )
        for mode in modes:
            runs = by_mode[mode]
            errors = sum(run["errors"] for run in runs)
            print(
                f"  {mode:10}{summary([r['rps'] for r in runs], 1):>22}   "
                f"{summary([r['p50_ms'] for r in runs])}   {summary([r['p99_ms'] for r in runs])}"
                f"   {summary([r['cpu_ms'] for r in runs])}"
                + (f"   ({errors} errors)" if errors else "")
            )

        def added(mode: str, base: str, by_mode: dict[str, list[dict[str, Any]]] = by_mode) -> str:
            deltas = [
                m["p50_ms"] - b["p50_ms"] for b, m in zip(by_mode[base], by_mode[mode], strict=True)
            ]
            return f"{statistics.median(deltas):+.2f} ms [{min(deltas):+.2f}..{max(deltas):+.2f}]"

        for mode in ("legacy", "legacy_rl"):
            if mode not in modes:
                continue
            ratio = [
                g["p50_ms"] / b["p50_ms"]
                for b, g in zip(by_mode["single"], by_mode[mode], strict=True)
            ]
            print(
                f"  p50 {mode}/single {summary(ratio)} (target <= {LEGACY_TARGET}: "
                f"{'meets' if statistics.median(ratio) <= LEGACY_TARGET else 'MISSES'} it); "
                f"{mode} vs single {added(mode, 'single')}"
            )
        if {"legacy", "shadow_ext"} <= set(modes):
            shadow_added = statistics.median(
                s["p50_ms"] - g["p50_ms"]
                for g, s in zip(by_mode["legacy"], by_mode["shadow_ext"], strict=True)
            )
            print(
                f"  p50 added: shadow_ext vs legacy {added('shadow_ext', 'legacy')} = "
                f"{shadow_added / ping:.1f} Redis round trips (target <= 1: "
                f"{'meets' if shadow_added <= ping else 'MISSES'} it)"
            )
        if {"legacy", "shadow", "naive"} <= set(modes):
            print(
                f"  shadow (worker in process) vs legacy {added('shadow', 'legacy')}; "
                f"shadow vs single {added('shadow', 'single')}; naive vs single "
                f"{added('naive', 'single')}; shadow vs naive {added('shadow', 'naive')}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "_standin":
        run_standin(int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
