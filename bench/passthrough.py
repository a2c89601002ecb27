"""What ``DualWriteMiddleware`` costs the requests it does not dual-write: a small Starlette app,
bare and wrapped, under the same server, in one run.

Two uvicorn processes serve the same app (``GET /hello`` answering a small JSON body; one usage
route configured, so every request is matched against the route table): one bare, one wrapped in
``DualWriteMiddleware`` with its engine started by the lifespan (Redis connection, flag
subscription, in-process outbox worker polling its stream). A load generator in a third process
sends ``GET /hello`` on N keep-alive connections. Runs alternate bare and wrapped, so drift hits
both alike. Targets: wrapped/bare throughput >= 0.97 in every run, p99 within 3 %.

What runs in the wrapped process besides requests (the outbox worker's blocking stream read, the
flag-change subscription, the durability watch, the spool replayer) is measured too: each app
variant with one of them switched off is started and left idle for ``--idle-seconds``, and its
CPU read from ``/proc`` (``quiet``: all of them off).

    python bench/passthrough.py                    # 5 runs x 3 s, concurrency 1 and 16
    python bench/passthrough.py --runs 7 --seconds 5 --concurrency 1,8,64
    python bench/passthrough.py --runs 0 --idle-seconds 20      # idle CPU only

Needs Redis (``REDIS_URL``); its keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from typing import Any

from _load import REDIS_URL, child, cleanup, cpu_seconds, free_port, http_request, measure, summary
from _scenario import EVENT_NAME, KEY, USAGE_ROUTE

APPS = ("bare", "wrapped")
#: Served and loaded side by side: ``quiet`` is ``wrapped`` with its background work off.
SERVED = ("bare", "wrapped", "quiet")
#: The in-process background work of the wrapped app, each switched off in one idle variant.
BACKGROUND = ("worker", "flags", "durability", "spool")
IDLE_VARIANTS = ("bare", "wrapped", *(f"no_{task}" for task in BACKGROUND), "quiet")
THROUGHPUT_TARGET = 0.97
P99_TARGET = 1.03


def build_app(*, wrapped: bool, prefix: str, off: frozenset[str] = frozenset()) -> Any:
    """The app under test, bare or wrapped in the middleware (with the background work named in
    ``off`` switched off)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from dualwrite import DualWriteMiddleware, Settings

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    async def usage(request: Request) -> JSONResponse:
        return JSONResponse({"recorded": True})

    app = Starlette(
        routes=[
            Route("/hello", hello),
            Route("/usage/{customer}", usage, methods=["POST"]),
        ]
    )
    if not wrapped:
        return app
    settings = Settings(
        redis={"url": REDIS_URL, "key_prefix": prefix},
        # Never called: only non-usage requests are sent.
        stripe={"api_base": "http://127.0.0.1:9"},
        routes=[USAGE_ROUTE],
        meters=[{"event_name": EVENT_NAME}],
        outbox={"run_in_process": "worker" not in off, "spool": "spool" not in off},
    )
    middleware = DualWriteMiddleware(app, config=settings)
    if "flags" in off:  # no change subscription: stages then expire by the cache TTL alone

        async def unsubscribed() -> None:
            return None

        setattr(middleware.engine.resolver, "start", unsubscribed)  # noqa: B010 - a bench switch
    if "durability" in off:
        middleware.durability.interval = 1e9  # checked once at start, never again
    return middleware


def _off(variant: str) -> frozenset[str]:
    if variant == "quiet":
        return frozenset(BACKGROUND)
    return frozenset({variant.removeprefix("no_")} & set(BACKGROUND))


def in_process_us(prefix: str, calls: int, runs: int) -> dict[str, list[float]]:
    """Microseconds per ASGI call of the bare and the wrapped app, no server or socket in the way
    (alternating, ``runs`` times): what the middleware itself adds to a request."""
    import asyncio

    async def measure_apps() -> dict[str, list[float]]:
        apps = {name: build_app(wrapped=name == "wrapped", prefix=prefix) for name in APPS}
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/hello",
            "raw_path": b"/hello",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1")],
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 50000),
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            return None

        times: dict[str, list[float]] = {name: [] for name in APPS}
        for run in range(runs):
            for name in APPS if run % 2 == 0 else APPS[::-1]:
                app = apps[name]
                started = time.perf_counter()
                for _ in range(calls):
                    await app(dict(scope), receive, send)
                times[name].append((time.perf_counter() - started) / calls * 1e6)
        await apps["wrapped"].aclose()
        return times

    return asyncio.run(measure_apps())


def serve(port: int, mode: str, prefix: str) -> None:
    """Child: uvicorn serving the app variant ``mode``, quiet."""
    import uvicorn

    app = build_app(wrapped=mode != "bare", prefix=prefix, off=_off(mode))
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        server_header=False,
        date_header=False,
    )


def idle_cpu(prefix: str, env: dict[str, str], seconds: float) -> dict[str, float]:
    """Milliseconds of CPU per second each variant uses with no request at all."""
    used: dict[str, float] = {}
    for variant in IDLE_VARIANTS:
        port = free_port()
        argv = [__file__, "_serve", str(port), variant, prefix]
        with child(argv, what=f"{variant} app", env=env, port=port) as server:
            time.sleep(1.0)  # past the start-up checks
            before, started = cpu_seconds(server.pid), time.monotonic()
            time.sleep(seconds)
            used[variant] = (cpu_seconds(server.pid) - before) / (time.monotonic() - started) * 1000
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument(
        "--idle-seconds", type=float, default=10.0, help="idle CPU per variant (0: skip)"
    )
    options = parser.parse_args()
    levels = [int(level) for level in options.concurrency.split(",")] if options.runs else []

    env = dict(os.environ, STRIPE_API_KEY=KEY)
    prefix = f"dwbench-{uuid.uuid4().hex[:8]}"
    ports = {name: free_port() for name in SERVED}
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    try:
        with contextlib.ExitStack() as servers:
            for name in SERVED:
                argv = [__file__, "_serve", str(ports[name]), name, prefix]
                servers.enter_context(child(argv, what=f"{name} app", env=env, port=ports[name]))
            for level in levels:
                results[level] = {name: [] for name in SERVED}
                for run in range(options.runs):
                    for name in SERVED if run % 2 == 0 else SERVED[::-1]:
                        url = f"http://127.0.0.1:{ports[name]}"
                        request = http_request("GET", url, "/hello")
                        results[level][name].append(
                            measure(url, request, seconds=options.seconds, concurrency=level)
                        )
        micro = in_process_us(prefix, 20_000, max(7, options.runs))
        idle = idle_cpu(prefix, env, options.idle_seconds) if options.idle_seconds > 0 else {}
    finally:
        cleanup(prefix)

    print(
        f"GET /hello, {options.runs} runs x {options.seconds:g} s per app, uvicorn, "
        f"{os.cpu_count()} CPUs shared by the load generator and the server, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    for level, by_app in results.items():
        print(f"\nconcurrency {level:<4}  req/s median [min..max]   p50 ms          p99 ms")
        for name in SERVED:
            runs = by_app[name]
            errors = sum(run["errors"] for run in runs)
            print(
                f"  {name:9}{summary([r['rps'] for r in runs], 0):>24}   "
                f"{summary([r['p50_ms'] for r in runs])}   {summary([r['p99_ms'] for r in runs])}"
                + (f"   ({errors} errors)" if errors else "")
            )
        for name in SERVED[1:]:
            pairs = list(zip(by_app["bare"], by_app[name], strict=True))
            ratio = [w["rps"] / b["rps"] for b, w in pairs]
            p99 = [w["p99_ms"] / b["p99_ms"] for b, w in pairs]
            verdict = (
                "meets"
                if min(ratio) >= THROUGHPUT_TARGET and statistics.median(p99) <= P99_TARGET
                else "MISSES"
            )
            print(
                f"  {name}/bare throughput {summary(ratio)} (target >= {THROUGHPUT_TARGET} in "
                f"every run); p99 {name}/bare {summary(p99)} (target <= {P99_TARGET}): "
                f"{verdict} the targets"
            )

    added = [w - b for b, w in zip(micro["bare"], micro["wrapped"], strict=True)]
    print(
        f"\nin process (ASGI calls, no server): bare {summary(micro['bare'])} us/request, "
        f"wrapped {summary(micro['wrapped'])} us/request; the middleware adds {summary(added)} us"
    )
    if idle:
        print(
            f"\nidle, no request ({options.idle_seconds:g} s each, CPU ms per second; 1000 = a whole "
            "core):"
        )
        for variant, ms in idle.items():
            print(f"  {variant:14}{ms:7.2f}   ({ms - idle['bare']:+.2f} vs bare)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
