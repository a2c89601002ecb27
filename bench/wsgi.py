"""The WSGI front door and the direct API: what they cost, measured side by side in one run.

1. ``dualwrite.wsgi.DualWriteMiddleware`` on a request it does not dual-write. Two gunicorn
   servers (2 workers each, ``gthread`` with 4 threads, so connections are kept alive) serve the
   same small Flask app (``GET /hello``; one usage route configured, so every request is matched
   against the route table), one bare and one wrapped. A load generator in its own process sends
   ``GET /hello`` on N keep-alive connections; runs alternate bare and wrapped. Target:
   wrapped/bare throughput >= 0.97. The microseconds the middleware adds to one WSGI call, with no
   server in the way, are printed too.
2. ``SyncRecorder.record`` at ``shadow`` against ``legacy``: one thread records one usage event at
   a time for a customer at each stage, alternating blocks, against the stand-in (its own process,
   answering after ``--latency-ms``). At ``shadow`` the meter event goes to the outbox in the same
   Redis transaction and the recorder's in-process worker delivers it on the recorder's own loop.
   Target: p50 shadow/legacy <= 1.02.

    python bench/wsgi.py                     # 5 runs x 3 s at concurrency 1 and 8; 5 x 200 records
    python bench/wsgi.py --runs 7 --records 400 --latency-ms 50
    python bench/wsgi.py --only recorder --no-worker   # the record path alone, no deliveries

Needs Redis (``REDIS_URL``); its keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from typing import Any

from _load import child, cleanup, free_port, http_request, measure, summary
from _scenario import EVENT_NAME, KEY, Catalog, run_standin
from usage_routes import _settings  # the usage route, limits off, no spool

APPS = ("bare", "wrapped")
THROUGHPUT_TARGET = 0.97
LATENCY_TARGET = 1.02
BENCH = os.path.dirname(os.path.abspath(__file__))


def build_app(mode: str) -> Any:
    """The Flask app, bare or wrapped (gunicorn factory: ``wsgi:build_app('wrapped')``)."""
    from flask import Flask

    from dualwrite.wsgi import DualWriteMiddleware

    app = Flask("bench")

    @app.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.post("/usage/<customer>")
    def usage(customer: str) -> dict[str, bool]:
        return {"recorded": True}

    if mode == "wrapped":
        # Never called: only non-usage requests are sent.
        settings = _settings(os.environ["BENCH_PREFIX"], "http://127.0.0.1:9", worker=True)
        app.wsgi_app = DualWriteMiddleware(app.wsgi_app, config=settings)  # type: ignore[method-assign]
    return app


def in_process_us(prefix: str, calls: int, runs: int) -> dict[str, list[float]]:
    """Microseconds per WSGI call of a bare and a wrapped minimal app (no server, no Flask)."""
    from dualwrite.wsgi import DualWriteMiddleware

    def bare(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]

    apps: dict[str, Any] = {
        "bare": bare,
        "wrapped": DualWriteMiddleware(
            bare, config=_settings(prefix, "http://127.0.0.1:9", worker=True)
        ),
    }
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/hello", "QUERY_STRING": ""}
    times: dict[str, list[float]] = {name: [] for name in APPS}
    for run in range(runs):
        for name in APPS if run % 2 == 0 else APPS[::-1]:
            app = apps[name]
            started = time.perf_counter()
            for _ in range(calls):
                app(dict(environ), lambda status, headers: None)
            times[name].append((time.perf_counter() - started) / calls * 1e6)
    return times


def gunicorn_argv(port: int, mode: str) -> list[str]:
    """``python -m gunicorn`` serving the app for ``mode`` (run with ``python``, as child does)."""
    return [
        "-m",
        "gunicorn",
        "--chdir",
        BENCH,
        "--workers",
        "2",
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "--no-control-socket",  # gunicorn 25.1+: one control socket per user, shared otherwise
        f"wsgi:build_app({mode!r})",
    ]


def wait_answering(url: str, *, timeout: float = 60.0) -> None:
    """Wait until the server's workers answer (gunicorn listens before its workers have booted)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    answered = 0
    while answered < 20:
        try:
            with urllib.request.urlopen(f"{url}/hello", timeout=5) as response:
                answered += response.status == 200
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def passthrough(options: argparse.Namespace, prefix: str) -> None:
    """Part 1: throughput of ``GET /hello``, bare and wrapped, under gunicorn."""
    levels = [int(level) for level in options.concurrency.split(",")]
    ports = {name: free_port() for name in APPS}
    env = dict(os.environ, STRIPE_API_KEY=KEY, BENCH_PREFIX=prefix)
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    with (
        child(gunicorn_argv(ports["bare"], "bare"), what="bare", env=env, port=ports["bare"]),
        child(
            gunicorn_argv(ports["wrapped"], "wrapped"),
            what="wrapped",
            env=env,
            port=ports["wrapped"],
        ),
    ):
        for port in ports.values():
            wait_answering(f"http://127.0.0.1:{port}")
        for level in levels:
            results[level] = {"bare": [], "wrapped": []}
            for run in range(options.runs):
                for name in APPS if run % 2 == 0 else APPS[::-1]:
                    url = f"http://127.0.0.1:{ports[name]}"
                    request = http_request("GET", url, "/hello")
                    results[level][name].append(
                        measure(url, request, seconds=options.seconds, concurrency=level)
                    )
    print(
        f"GET /hello (Flask), {options.runs} runs x {options.seconds:g} s per app, gunicorn "
        f"2 gthread workers x 4 threads, {os.cpu_count()} CPUs shared with the load generator"
    )
    for level, by_app in results.items():
        print(f"\nconcurrency {level:<4}  req/s median [min..max]   p50 ms          p99 ms")
        for name in APPS:
            runs = by_app[name]
            errors = sum(run["errors"] for run in runs)
            print(
                f"  {name:9}{summary([r['rps'] for r in runs], 0):>24}   "
                f"{summary([r['p50_ms'] for r in runs])}   {summary([r['p99_ms'] for r in runs])}"
                + (f"   ({errors} errors)" if errors else "")
            )
        pairs = list(zip(by_app["bare"], by_app["wrapped"], strict=True))
        ratio = [w["rps"] / b["rps"] for b, w in pairs]
        verdict = "meets" if statistics.median(ratio) >= THROUGHPUT_TARGET else "MISSES"
        print(
            f"  wrapped/bare throughput {summary(ratio)} (target >= {THROUGHPUT_TARGET}): "
            f"{verdict} the target"
        )
    micro = in_process_us(prefix, 20_000, max(7, options.runs))
    added = [w - b for b, w in zip(micro["bare"], micro["wrapped"], strict=True)]
    print(
        f"\nin process (WSGI calls, no server): bare {summary(micro['bare'])} us/request, "
        f"wrapped {summary(micro['wrapped'])} us/request; the middleware adds {summary(added)} us"
    )


def recorder_latency(options: argparse.Namespace, prefix: str) -> None:
    """Part 2: ``SyncRecorder.record`` p50 at shadow and at legacy, in alternating blocks."""
    import asyncio

    from dualwrite import Stage, SyncRecorder
    from dualwrite.flags import RedisFlagStore
    from dualwrite.keys import KeySpace
    from dualwrite.redis_client import open_redis

    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    latency = options.latency_ms / 1000
    with child([__file__, "_standin", str(port), str(latency)], what="stand-in", port=port):
        catalog = Catalog(upstream)
        customers = {stage: catalog.customer(stage) for stage in ("legacy", "shadow")}
        settings = _settings(prefix, upstream, worker=not options.no_worker)

        async def pin() -> None:
            client = open_redis(settings.redis)
            try:
                store = RedisFlagStore(client, KeySpace(prefix))
                for stage, (customer, _) in customers.items():
                    await store.set_override(customer, Stage(stage), actor="bench")
            finally:
                await client.aclose()

        asyncio.run(pin())
        times: dict[str, list[float]] = {"legacy": [], "shadow": []}
        blocks: dict[str, list[float]] = {"legacy": [], "shadow": []}  # p50 of each block
        with SyncRecorder(config=settings) as recorder:
            order = ("legacy", "shadow")
            for stage in order:  # warm-up: connections, caches, consumer group
                customer, item = customers[stage]
                for _ in range(20):
                    recorder.record(
                        customer=customer, subscription_item=item, quantity=1, event_name=EVENT_NAME
                    )
            for run in range(options.runs):
                for stage in order if run % 2 == 0 else order[::-1]:
                    customer, item = customers[stage]
                    block: list[float] = []
                    for _ in range(options.records):
                        started = time.perf_counter()
                        recorder.record(
                            customer=customer,
                            subscription_item=item,
                            quantity=1,
                            event_name=EVENT_NAME,
                        )
                        block.append((time.perf_counter() - started) * 1000)
                    times[stage] += block
                    blocks[stage].append(statistics.median(block))
    per_block = [s / lg for lg, s in zip(blocks["legacy"], blocks["shadow"], strict=True)]
    p50 = {stage: statistics.median(values) for stage, values in times.items()}
    ratio = p50["shadow"] / p50["legacy"]
    verdict = "meets" if ratio <= LATENCY_TARGET else "MISSES"
    where = "no outbox worker in the process" if options.no_worker else "in-process outbox worker"
    print(
        f"\nSyncRecorder.record, {options.runs} alternating blocks x {options.records} records per "
        f"stage, stand-in answering after {options.latency_ms:g} ms, {where}"
    )
    for stage, values in times.items():
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        print(f"  {stage:7} p50 {p50[stage]:.2f} ms   p99 {p99:.2f} ms")
    print(
        f"  p50 shadow/legacy {ratio:.3f} (target <= {LATENCY_TARGET}): {verdict} the target; "
        f"block by block {summary(per_block, 3)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    parser.add_argument("--records", type=int, default=200, help="records per stage per run")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="stand-in delay per reply")
    parser.add_argument("--only", choices=("passthrough", "recorder"))
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="SyncRecorder without its in-process outbox worker (the request path alone)",
    )
    options = parser.parse_args()
    os.environ["STRIPE_API_KEY"] = KEY  # the stand-in's key, read by the settings
    prefix = f"dwbench-{uuid.uuid4().hex[:8]}"
    try:
        if options.only != "recorder":
            passthrough(options, prefix)
        if options.only != "passthrough":
            recorder_latency(options, prefix)
    finally:
        cleanup(prefix)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_standin":
        run_standin(int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
