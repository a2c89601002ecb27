"""How fast ``dualwrite worker`` drains the outbox into Stripe's meter events, v1 and v2 paths, one
and two worker processes, against the rate the stand-in accepts from a plain SDK loop in the same run.

The stand-in runs in its own process and answers after ``--latency-ms`` (20 ms). For each path:

1. baseline: a plain SDK loop (the Stripe SDK on aiohttp, ``--concurrency`` calls in flight) sends
   the same number of events straight to the stand-in: v1 one event per call, v2 100 per stream
   call; its rate is what the stand-in can take from one Python client;
2. the outbox is pre-filled through the engine (customers at ``shadow``; the authoritative legacy
   write is acknowledged locally so that only meter events reach Stripe), then 1 and 2
   ``dualwrite worker`` processes are started and timed from the first entry read to the last one
   settled (the consumer group's lag and pending list both empty).

Workers run with the default rate limits (v1: 1,000 events/s and one call per customer per meter
at a time; v2: 10,000 events/s) and ``[outbox] concurrency`` = ``--concurrency``: at 20 ms per call,
the default 16 slots would cap v1 at 800/s before the limit does. Targets: v1 limited only by the
1,000/s limit; v2 >= 10,000 events/s.

    python bench/delivery.py                       # 3 runs, v1 5,000 and v2 30,000 events
    python bench/delivery.py --runs 1 --paths v2 --events-v2 50000 --workers 1

Needs Redis (``REDIS_URL``); its keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _load import REDIS_URL, child, cleanup, cpu_seconds, free_port, summary
from _scenario import EVENT_NAME, KEY, Catalog, run_standin

TARGETS = {"v1": 1_000.0, "v2": 10_000.0}
#: v1's target is the configured rate limit itself: a drain within 5 % of it is held by the limit
#: (GCRA admits no more). v2's is a floor: it is met only at or above it.
SHORTFALL_ALLOWED = {"v1": 0.95, "v2": 1.0}
FILL_CONCURRENCY = 200


def _config(path: Path, *, prefix: str, upstream: str, meter_path: str, concurrency: int) -> None:
    path.write_text(
        f'[redis]\nurl = "{REDIS_URL}"\nkey_prefix = "{prefix}"\n\n'
        f'[stripe]\napi_base = "{upstream}"\nmeter_path = "{meter_path}"\n\n'
        f"[outbox]\nconcurrency = {concurrency}\nbatch_size = {max(100, concurrency)}\n"
        "spool = false\nblock_ms = 50\n\n"
        '[ledger]\nperiods = "day"\n\n'
        f'[[meters]]\nevent_name = "{EVENT_NAME}"\n'
    )


async def _baseline(upstream: str, customers: list[str], count: int, path: str, conc: int) -> float:
    """Events/s a plain SDK loop gets the stand-in to accept."""
    import stripe

    from dualwrite.stripe_io._http import PooledAIOHTTPClient

    http = PooledAIOHTTPClient(timeout=20, max_connections=conc, verify_tls=False)
    client = stripe.StripeClient(
        KEY,
        base_addresses={"api": upstream, "meter_events": upstream},
        http_client=http,
        max_network_retries=0,
    )
    now = int(time.time())
    batch = 100 if path == "v2" else 1
    calls = [list(range(start, min(count, start + batch))) for start in range(0, count, batch)]
    token = ""
    if path == "v2":
        session = await client.v2.billing.meter_event_session.create_async()
        token = session.authentication_token
    queue = iter(calls)

    async def sender() -> None:
        for call in queue:
            if path == "v1":
                index = call[0]
                await client.v1.billing.meter_events.create_async(
                    {
                        "event_name": EVENT_NAME,
                        "payload": {"stripe_customer_id": customers[index % len(customers)]},
                        "identifier": f"base-{uuid.uuid4().hex}",
                        "timestamp": now,
                    }
                )
            else:
                events: Any = [
                    {
                        "event_name": EVENT_NAME,
                        "payload": {
                            "stripe_customer_id": customers[index % len(customers)],
                            "value": "1",
                        },
                        "identifier": f"base-{uuid.uuid4().hex}",
                    }
                    for index in call
                ]
                await client.v2.billing.meter_event_stream.create_async(
                    {"events": events}, {"api_key": token}
                )

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(conc)))
    elapsed = time.perf_counter() - started
    await http.close_async()
    return count / elapsed


async def _fill(config: Path, customers: list[str], count: int) -> float:
    """Enqueue ``count`` shadow meter events through the engine; events/s of the fill."""
    from dualwrite import Settings
    from dualwrite.engine import DualWriteEngine
    from dualwrite.flags import RedisFlagStore
    from dualwrite.models import Leg, Stage, UsageEvent, WriteResult

    settings = Settings.load(str(config))
    engine = DualWriteEngine.from_settings(settings)
    # Before the engine starts, so that its resolver has nothing cached yet.
    await RedisFlagStore(engine.redis, engine.keys).set_default(Stage.SHADOW, actor="bench")
    await engine.start(worker=False)
    try:
        now = int(time.time())

        async def acknowledged(event: UsageEvent) -> WriteResult:
            return WriteResult(
                leg=Leg.LEGACY, accepted=True, stripe_id="mbur_bench", http_status=200, value=1
            )

        async def filler(indices: range) -> None:
            for index in indices:
                event = UsageEvent(
                    identifier=f"bench-{index}-{uuid.uuid4().hex[:8]}",
                    customer=customers[index % len(customers)],
                    subscription_item="si_bench",
                    event_name=EVENT_NAME,
                    quantity=1,
                    timestamp=now,
                )
                outcome = await engine.record(event, legacy_write=acknowledged)
                if outcome.shadow_status != "enqueued":
                    msg = f"fill: event not enqueued ({outcome.stage}, {outcome.shadow_status})"
                    raise SystemExit(msg)

        started = time.perf_counter()
        await asyncio.gather(
            *(filler(range(start, count, FILL_CONCURRENCY)) for start in range(FILL_CONCURRENCY))
        )
        return count / (time.perf_counter() - started)
    finally:
        await engine.aclose()


def _group_state(prefix: str) -> tuple[int, int, int]:
    """(entries read by the group, pending, waiting: lag plus retry set) of shard 0's outbox."""
    import redis

    from dualwrite.keys import KeySpace
    from dualwrite.outbox import OUTBOX_GROUP

    shard = KeySpace(prefix).shard(0)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        groups = client.xinfo_groups(shard.outbox)
        retry = int(client.zcard(shard.retry))
    finally:
        client.close()
    for group in groups:
        if group["name"] == OUTBOX_GROUP:
            return (
                int(group["entries-read"] or 0),
                int(group["pending"]),
                int(group["lag"] or 0) + retry,
            )
    return 0, 0, 0


def _drain(config: Path, prefix: str, workers: int, count: int) -> dict[str, float]:
    """Start ``workers`` worker processes and time the drain; events/s and CPU ms per event."""
    env = dict(os.environ, STRIPE_API_KEY=KEY)
    # ``dualwrite --config FILE worker``, run by this interpreter.
    argv = ["-m", "dualwrite", "--config", str(config), "worker"]
    processes = [child(argv, what="worker", env=env) for _ in range(workers)]
    running = [manager.__enter__() for manager in processes]
    try:
        read_before = _group_state(prefix)[0]
        started = None
        cpu_before = [0.0] * workers
        deadline = time.monotonic() + 300
        while True:
            read, pending, waiting = _group_state(prefix)
            now = time.perf_counter()
            if started is None and read > read_before:
                started = now
                cpu_before = [cpu_seconds(p.pid) for p in running]
            if started is not None and pending == 0 and waiting == 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"drain did not finish: {pending} pending, {waiting} waiting")
            for process in running:
                if process.poll() is not None:
                    raise SystemExit(f"a worker exited with status {process.returncode}")
            time.sleep(0.005)
        elapsed = now - started
        cpu = sum(cpu_seconds(p.pid) - b for p, b in zip(running, cpu_before, strict=True))
    finally:
        for manager in reversed(processes):
            manager.__exit__(None, None, None)
    return {"rate": count / elapsed, "cpu_ms": cpu / count * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--paths", default="v1,v2")
    parser.add_argument("--workers", default="1,2", help="comma-separated process counts")
    parser.add_argument("--events-v1", type=int, default=5_000)
    parser.add_argument("--events-v2", type=int, default=30_000)
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight per worker")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="stand-in delay per reply")
    options = parser.parse_args()
    paths = options.paths.split(",")
    worker_counts = [int(count) for count in options.workers.split(",")]
    counts = {"v1": options.events_v1, "v2": options.events_v2}

    env = dict(os.environ, STRIPE_API_KEY=KEY)
    standin_port = free_port()
    upstream = f"http://127.0.0.1:{standin_port}"
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    prefixes: list[str] = []
    with (
        tempfile.TemporaryDirectory() as workdir,
        child(
            [__file__, "_standin", str(standin_port), str(options.latency_ms / 1000)],
            what="stand-in",
            env=env,
            port=standin_port,
        ) as standin,
    ):
        try:
            customers = Catalog(upstream).customers(options.customers)
            for path in paths:
                count = counts[path]
                results[path] = {"baseline": [], **{f"{n} worker": [] for n in worker_counts}}
                for _ in range(options.runs):
                    before = cpu_seconds(standin.pid)
                    rate = asyncio.run(
                        _baseline(upstream, customers, count, path, options.concurrency)
                    )
                    standin_cpu = (cpu_seconds(standin.pid) - before) / count * 1000
                    results[path]["baseline"].append({"rate": rate, "standin_cpu_ms": standin_cpu})
                    for workers in worker_counts:
                        prefix = f"dwbench-{uuid.uuid4().hex[:8]}"
                        prefixes.append(prefix)
                        config = Path(workdir) / f"{prefix}.toml"
                        _config(
                            config,
                            prefix=prefix,
                            upstream=upstream,
                            meter_path=path,
                            concurrency=options.concurrency,
                        )
                        fill = asyncio.run(_fill(config, customers, count))
                        before = cpu_seconds(standin.pid)
                        drained = _drain(config, prefix, workers, count)
                        drained["fill_rate"] = fill
                        drained["standin_cpu_ms"] = (
                            (cpu_seconds(standin.pid) - before) / count * 1000
                        )
                        results[path][f"{workers} worker"].append(drained)
                        cleanup(prefix)
        finally:
            for prefix in prefixes:
                cleanup(prefix)

    print(
        f"meter events drained by `dualwrite worker`, {options.runs} runs, stand-in latency "
        f"{options.latency_ms:g} ms, {options.customers} customers, {options.concurrency} calls in "
        f"flight per process, {os.cpu_count()} CPUs shared by stand-in, workers and Redis"
    )
    for path, by_case in results.items():
        target = TARGETS[path]
        print(
            f"\n{path} ({counts[path]:,} events)   events/s median [min..max]     "
            "vs baseline    CPU ms/event: worker   stand-in"
        )
        base = [run["rate"] for run in by_case["baseline"]]
        print(
            f"  plain SDK loop  {summary(base, 0):>26}   1.00          {'':>17}"
            f"{summary([r['standin_cpu_ms'] for r in by_case['baseline']], 3)}"
        )
        for case, runs in by_case.items():
            if case == "baseline":
                continue
            rates = [run["rate"] for run in runs]
            ratio = [run["rate"] / b for run, b in zip(runs, base, strict=True)]
            print(
                f"  {case + 's' if not case.startswith('1 ') else case:14}  {summary(rates, 0):>26}"
                f"   {summary(ratio)}   {summary([r['cpu_ms'] for r in runs], 3):>20}   "
                f"{summary([r['standin_cpu_ms'] for r in runs], 3)}"
            )
            median = statistics.median(rates)
            floor = target * SHORTFALL_ALLOWED[path]
            verdict = "meets" if median >= floor else "MISSES"
            # The stand-in is one Python process: when the workers get about as much out of it as
            # the plain loop does, it is the bottleneck, not they.
            bound = ""
            if median < floor:
                stand_in_bound = median >= statistics.median(base) * 0.9
                bound = (
                    "; the stand-in (one Python process) is the bottleneck"
                    if stand_in_bound
                    else "; the workers are the bottleneck (the stand-in takes more)"
                )
            per_core = 1000 / statistics.median([r["cpu_ms"] for r in runs])
            print(
                f"    target {target:,.0f}/s: {verdict}{bound}; at its CPU per event one worker "
                f"on a free core would sustain about {per_core:,.0f} events/s"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_standin":
        run_standin(int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
