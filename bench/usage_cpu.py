"""The CPU a usage request costs the app's process: the app's own Stripe call against the same
request through ``DualWriteMiddleware`` at ``legacy``, in one run, with an optional profile.

The Stripe stand-in runs in its own process (``--latency-ms``, 0 by default: only this process's
CPU is measured, and waiting costs none). This process builds the ``single`` and ``legacy`` apps of
``bench/usage_routes.py`` (same route, same SDK and HTTP client; ``legacy_rl`` is ``legacy`` with
the legacy rate limit on, its token taken in the claim's round trip) and calls each through ASGI
directly, no server or socket in front, ``--requests`` sequential requests a round, alternating,
``--runs`` rounds; it prints the CPU (``time.process_time``) per request of each, their ratio and
difference. ``--profile`` then runs ``cProfile`` over ``--requests`` more ``legacy`` requests and
prints the functions that cost most (own time), to see where the middleware's CPU goes.

    python bench/usage_cpu.py                      # 7 rounds x 400 requests
    python bench/usage_cpu.py --profile --top 40

Needs Redis (``REDIS_URL``); its keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import uuid
from typing import Any

from _load import child, cleanup, free_port, summary
from _scenario import KEY, Catalog, run_standin
from usage_routes import _pin, build_app

MODES = ("single", "legacy", "legacy_rl")


class Lifespan:
    """Runs an ASGI app's lifespan in a task: ``start()`` waits for startup, ``stop()`` for
    shutdown (the middleware starts its engine and checks Redis there)."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Send ``lifespan.startup`` and wait for its answer."""

        async def send(message: dict[str, Any]) -> None:
            await self._outbox.put(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(self._app(scope, self._inbox.get, send))
        await self._inbox.put({"type": "lifespan.startup"})
        answer = await self._outbox.get()
        if answer["type"] != "lifespan.startup.complete":
            raise SystemExit(f"the app did not start: {answer}")

    async def stop(self) -> None:
        """Send ``lifespan.shutdown`` and wait for the app to finish."""
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._outbox.get()
        if self._task is not None:
            await self._task


async def _call(app: Any, customer: str, body: bytes) -> tuple[int, bytes]:
    """One ``POST /usage/{customer}`` through ``app``'s ASGI interface: its status and body."""
    path = f"/usage/{customer}"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 50000),
        "state": {},
    }
    sent = False
    status, reply = 0, b""

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, reply
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            reply += message.get("body", b"")

    await app(scope, receive, send)
    return status, reply


async def _rounds(
    apps: dict[str, Any], scenario: dict[str, tuple[str, str]], requests: int, runs: int
) -> dict[str, list[float]]:
    """CPU microseconds per request of each app, ``runs`` rounds of ``requests``, alternating."""
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for run in range(runs + 1):  # the first round warms caches and connections, and is dropped
        for mode in MODES if run % 2 == 0 else MODES[::-1]:
            customer, item = scenario[mode]
            body = json.dumps({"item": item, "quantity": 1}).encode()
            started = time.process_time()
            for _ in range(requests):
                status, reply = await _call(apps[mode], customer, body)
                if status != 200:
                    raise SystemExit(f"{mode}: a usage request got HTTP {status}: {reply!r}")
            if run:
                cpu[mode].append((time.process_time() - started) / requests * 1e6)
    return cpu


async def _measure(
    prefix: str, upstream: str, scenario: dict[str, tuple[str, str]], options: argparse.Namespace
) -> tuple[dict[str, list[float]], str | None]:
    apps = {mode: build_app(mode, prefix, upstream) for mode in MODES}
    lifespans = [Lifespan(apps[mode]) for mode in MODES]
    for lifespan in lifespans:
        await lifespan.start()
    try:
        cpu = await _rounds(apps, scenario, options.requests, options.runs)
        profile = None
        if options.profile:
            customer, item = scenario["legacy"]
            body = json.dumps({"item": item, "quantity": 1}).encode()
            profiler = cProfile.Profile(time.process_time)  # CPU, not a busy host's wall time
            profiler.enable()
            for _ in range(options.requests):
                await _call(apps["legacy"], customer, body)
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(options.top)
            stats.sort_stats("cumulative").print_stats(options.top)
            profile = out.getvalue()
    finally:
        for lifespan in lifespans:
            await lifespan.stop()
    return cpu, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--requests", type=int, default=400, help="requests per app per round")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="stand-in delay per reply")
    parser.add_argument("--profile", action="store_true", help="profile the legacy requests")
    parser.add_argument("--top", type=int, default=30, help="functions the profile lists")
    options = parser.parse_args()

    os.environ["STRIPE_API_KEY"] = KEY
    prefix = f"dwbench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    try:
        with child(
            [__file__, "_standin", str(port), str(options.latency_ms / 1000)],
            what="stand-in",
            port=port,
        ):
            catalog = Catalog(upstream)
            scenario = {mode: catalog.customer(mode) for mode in MODES}
            pins = {scenario[mode][0]: "legacy" for mode in ("legacy", "legacy_rl")}
            asyncio.run(_pin(prefix, pins))
            cpu, profile = asyncio.run(_measure(prefix, upstream, scenario, options))
    finally:
        cleanup(prefix)

    print(
        f"POST /usage/{{customer}} through ASGI (no server), {options.runs} rounds x "
        f"{options.requests} requests per app, stand-in latency {options.latency_ms:g} ms, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for mode in MODES:
        print(f"  {mode:8} CPU {summary(cpu[mode], 0)} us/request")
    for mode in ("legacy", "legacy_rl"):
        ratios = [g / s for s, g in zip(cpu["single"], cpu[mode], strict=True)]
        added = [g - s for s, g in zip(cpu["single"], cpu[mode], strict=True)]
        print(
            f"  {mode}/single {summary(ratios)}; the middleware at {mode} adds "
            f"{statistics.median(added):.0f} us of CPU per request "
            f"[{min(added):.0f}..{max(added):.0f}]"
        )
    if profile is not None:
        print(profile)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_standin":
        run_standin(int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
