"""Soak: the proxy and two worker processes under steady load, with faults on a schedule.

Everything runs on loopback, in processes of its own: a private ``redis-server`` on a free port
(restarted during the run; the shared Redis is never touched), the Stripe stand-in, ``dualwrite
serve`` (no in-process worker) and two ``dualwrite worker`` processes. A load generator posts usage
records through the proxy at a steady rate, retrying 5xx/429/network failures with the same
Idempotency-Key, as an SDK does. Each fault cycle (one per minute) injects, in turn: stand-in
failures (5xx, 429, late replies) through its control API, a Redis restart, and a ``kill -9`` of a
worker followed by its restart.

With ``--slowloris N``, ``bench/_slowloris.py`` holds N slow connections to the proxy for the
whole run beside the load (each reopened as soon as the proxy closes it): every normal request
must still be served.

At the end it waits for the outbox to drain and checks exact totals: what the callers were told was
recorded == the ledger == the stand-in's own totals, on both paths, per customer. It samples the
RSS of the proxy and the workers and Redis's DBSIZE and stream memory every few seconds, and prints
first/last/max and the slope of each. Exit status 1 when any total disagrees.

    python bench/soak.py --minutes 1                   # quick check
    python bench/soak.py                               # 10 minutes
    python bench/soak.py --slowloris 1000              # 10 minutes beside a slowloris
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import stripe

from dualwrite.config import DEFAULT_LEGACY_API_VERSION, Settings
from dualwrite.flags import RedisFlagStore
from dualwrite.keys import KeySpace
from dualwrite.ledger import Ledger
from dualwrite.models import Stage
from dualwrite.testing import (
    RedisServerError,
    RedisServerProcess,
    legacy_price_params,
    meter_params,
)

LEGACY_VERSION = DEFAULT_LEGACY_API_VERSION
EVENT_NAME = "api_requests"
API_KEY = "sk_test_soakBench000000000000000000000001"
PREFIX = "dwsoak"
STAGES = (Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY, Stage.METER)
SAMPLE_SECONDS = 5.0
#: RSS is sampled from then on (start-up imports are not growth).
WARM_UP_SECONDS = 20.0
#: How long a request is retried before it counts as given up (its key is then never reused).
REQUEST_DEADLINE = 60.0


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, seconds: float = 20.0) -> None:
    """Wait until ``url`` answers anything."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not come up") from None
            time.sleep(0.1)


class PrivateRedis(RedisServerProcess):
    """A redis-server of the soak's own (appendonly, so a restart keeps what it acknowledged)."""

    def __init__(self, directory: Path):
        super().__init__(directory, appendfsync="everysec", start_timeout=10.0, stop_timeout=20.0)

    def start(self) -> None:
        """Start it and wait until it answers PING (exits the soak when it does not)."""
        try:
            super().start()
        except RedisServerError as exc:
            raise SystemExit(f"the private redis-server did not start: {exc}") from None


@dataclass
class Services:
    """The processes of one soak run."""

    directory: Path
    redis: PrivateRedis
    standin_url: str = ""
    proxy_url: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    config: Path | None = None

    def env(self) -> dict[str, str]:
        """The environment of every dualwrite process: the config, the key, a private spool."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUALWRITE_")}
        env["STRIPE_API_KEY"] = API_KEY
        env["XDG_STATE_HOME"] = str(self.directory / "state")
        if self.config is not None:
            env["DUALWRITE_CONFIG"] = str(self.config)
        return env

    def spawn(self, name: str, args: list[str]) -> None:
        """Start a dualwrite command as a process of its own (its output to a log file)."""
        log = (self.directory / f"{name}.log").open("ab")
        command = [sys.executable, "-c", "from dualwrite.cli import main; main()", *args]
        self.processes[name] = subprocess.Popen(
            command, env=self.env(), stdout=log, stderr=subprocess.STDOUT
        )

    def start_backends(self) -> None:
        """The private Redis and the stand-in."""
        self.redis.start()
        port = free_port()
        self.standin_url = f"http://127.0.0.1:{port}"
        self.spawn("standin", ["stripe-standin", "--port", str(port)])
        wait_http(self.standin_url + "/_standin/state")

    def start_slowloris(self, connections: int, seconds: float) -> None:
        """``bench/_slowloris.py`` against the proxy, its JSON tally to ``slowloris.log``."""
        port = self.proxy_url.rsplit(":", 1)[1]
        script = Path(__file__).resolve().parent / "_slowloris.py"
        log = (self.directory / "slowloris.log").open("ab")
        self.processes["slowloris"] = subprocess.Popen(
            [sys.executable, str(script), "127.0.0.1", port, str(connections), f"{seconds:g}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def slowloris_tally(self) -> dict[str, Any] | None:
        """What the slowloris saw (once it ended), or None when it was not run."""
        process = self.processes.get("slowloris")
        if process is None:
            return None
        process.wait(timeout=120)
        lines = (self.directory / "slowloris.log").read_text().strip().splitlines()
        return dict(json.loads(lines[-1])) if lines else {"error": "no tally"}

    def start_dualwrite(self, legacy_price: str) -> None:
        """The config (mapping ``legacy_price`` to the meter), the proxy and two workers."""
        self.config = self.directory / "dualwrite.toml"
        self.config.write_text(
            f'[redis]\nurl = "{self.redis.url}"\nkey_prefix = "{PREFIX}"\n'
            "socket_timeout = 0.5\nconnect_timeout = 0.5\n\n"
            f'[stripe]\napi_base = "{self.standin_url}"\ntimeout = 3.0\n\n'
            "[outbox]\nrun_in_process = false\nclaim_idle_seconds = 5\n"
            "backoff_base = 0.2\nbackoff_max = 5\n\n"
            f'[[meters]]\nevent_name = "{EVENT_NAME}"\nlegacy_prices = ["{legacy_price}"]\n',
            encoding="utf-8",
        )
        proxy_port = free_port()
        self.proxy_url = f"http://127.0.0.1:{proxy_port}"
        self.spawn("proxy", ["serve", "--port", str(proxy_port), "--no-access-log"])
        wait_http(self.proxy_url + "/_dualwrite/health")
        for index in (1, 2):
            self.spawn(f"worker{index}", ["worker", "--name", f"soak-worker-{index}"])

    def kill_worker(self, name: str) -> None:
        """kill -9 a worker, then start it again under the same name."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        self.spawn(name, ["worker", "--name", f"soak-{name}-{uuid.uuid4().hex[:4]}"])

    def stop(self) -> None:
        """SIGTERM every process, then Redis."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.redis.stop()


# ---------------------------------------------------------------------------------- set-up


@dataclass
class Customer:
    """One customer of the soak: its item and stage."""

    id: str
    item: str
    stage: Stage


def create_customers(standin_url: str, count: int) -> tuple[list[Customer], str]:
    """Customers on a legacy metered price, through the SDK; returns them and the price."""
    client = stripe.StripeClient(
        API_KEY,
        base_addresses={"api": standin_url, "meter_events": standin_url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )
    client.v1.billing.meters.create(meter_params(EVENT_NAME, display_name="API"))
    product = client.v1.products.create({"name": "API"})
    price = client.v1.prices.create(
        legacy_price_params(product.id), {"stripe_version": LEGACY_VERSION}
    )
    customers = []
    for index in range(count):
        customer = client.v1.customers.create({"name": f"soak {index}"})
        subscription = client.v1.subscriptions.create(
            {"customer": customer.id, "items": [{"price": price.id}]},
            {"stripe_version": LEGACY_VERSION},
        )
        item = subscription["items"]["data"][0]["id"]
        customers.append(Customer(customer.id, item, STAGES[index % len(STAGES)]))
    return customers, price.id


# ------------------------------------------------------------------------------------ load


@dataclass
class Load:
    """What the callers sent and what they were told."""

    intended: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    accepted: int = 0
    retries: int = 0
    given_up: int = 0
    refused: Counter[int] = field(default_factory=Counter)


async def one_request(
    client: httpx.AsyncClient, customer: Customer, quantity: int, load: Load
) -> None:
    """Post one usage record, retrying retryable failures with the same key, as an SDK does."""
    key = f"soak-{uuid.uuid4().hex}"
    headers = {"Idempotency-Key": key, "Stripe-Version": LEGACY_VERSION}
    deadline = time.monotonic() + REQUEST_DEADLINE
    load.sent += 1
    delay = 0.2
    while True:
        try:
            response = await client.post(
                f"/v1/subscription_items/{customer.item}/usage_records",
                data={"quantity": str(quantity), "timestamp": "now"},
                headers=headers,
            )
            status = response.status_code
            retry = status in (409, 429) or status >= 500
        except httpx.HTTPError:
            status, retry = 0, True
        if 200 <= status < 300:
            load.accepted += 1
            load.intended[customer.id] += quantity
            return
        if not retry:
            load.refused[status] += 1
            return
        if time.monotonic() > deadline:
            # Unknown outcome: Stripe may hold it. Reported, and totals are then checked for it.
            load.given_up += 1
            return
        load.retries += 1
        await asyncio.sleep(delay)
        delay = min(delay * 2, 3.0)


async def generate(
    url: str, customers: list[Customer], rate: float, until: float, load: Load
) -> None:
    """Steady load: ``rate`` requests per second until ``until`` (monotonic)."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=10.0) as client:
        tasks: set[asyncio.Task[None]] = set()
        index = 0
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= until:
                break
            due = start + index / rate
            if due > now:
                await asyncio.sleep(due - now)
            customer = customers[index % len(customers)]
            task = asyncio.create_task(one_request(client, customer, 1 + index % 7, load))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        if tasks:
            await asyncio.gather(*tasks)


# ----------------------------------------------------------------------------- faults, samples


async def fault_schedule(services: Services, until: float, log: list[str]) -> None:
    """Each minute: stand-in failures at 0:10-0:25, a Redis restart at 0:30, a worker kill at 0:45."""
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=services.standin_url, timeout=5.0) as control:
        cycle = 0
        while True:
            base = start + cycle * 60
            if base + 45 > until:
                return
            steps = [
                (10, "stand-in faults on (10 %: 500, 429, late replies)"),
                (25, "stand-in faults off"),
                (30, "redis restart"),
                (45, "kill -9 worker1, restart it"),
            ]
            for offset, what in steps:
                wait = base + offset - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                log.append(f"{time.monotonic() - start:6.1f}s {what}")
                if what.startswith("stand-in faults on"):
                    await control.post(
                        "/_standin/faults",
                        json={
                            "rate": 0.1,
                            "kinds": ["500", "429", "timeout"],
                            "timeout_seconds": 4,
                        },
                    )
                elif what == "stand-in faults off":
                    await control.post("/_standin/faults/clear")
                elif what == "redis restart":
                    await asyncio.to_thread(services.redis.stop)
                    await asyncio.sleep(2.0)
                    await asyncio.to_thread(services.redis.start)
                else:
                    await asyncio.to_thread(services.kill_worker, "worker1")
            cycle += 1


@dataclass
class Samples:
    """Time series sampled during the run."""

    rss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    dbsize: list[tuple[float, float]] = field(default_factory=list)
    persistent: list[tuple[float, float]] = field(default_factory=list)
    streams: list[tuple[float, float]] = field(default_factory=list)


def redis_sizes(client: redis.Redis) -> tuple[int, int, int]:
    """DBSIZE, the keys without a TTL (they must not grow with traffic), and the bytes held by
    every stream under the prefix (MEMORY USAGE)."""
    size = int(client.dbsize())
    keys = list(client.scan_iter(match=f"{PREFIX}:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    persistent = sum(1 for ttl in pipe.execute() if ttl == -1)
    total = 0
    for key in client.scan_iter(match=f"{PREFIX}:*", count=1000, _type="stream"):
        total += int(client.memory_usage(key) or 0)
    return size, persistent, total


def rss_mib(pid: int) -> float | None:
    """A process's resident set size in MiB (Linux ``/proc``), or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


async def sample(services: Services, until: float, samples: Samples) -> None:
    """RSS of the proxy and workers (by role: a restarted worker continues its series), Redis size."""
    start = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= until:
            return
        at = (now - start) / 60
        for name in ("proxy", "worker1", "worker2") if now - start >= WARM_UP_SECONDS else ():
            process = services.processes[name]
            rss = rss_mib(process.pid)
            if rss is None:
                continue  # being restarted
            samples.rss.setdefault(name, []).append((at, rss))
        try:
            client = redis.Redis.from_url(services.redis.url, socket_timeout=1)
            size, persistent, streams = await asyncio.to_thread(redis_sizes, client)
            client.close()
            samples.dbsize.append((at, size))
            samples.persistent.append((at, persistent))
            samples.streams.append((at, streams / 1024))
        except redis.RedisError:
            pass  # restarting
        await asyncio.sleep(SAMPLE_SECONDS)


def slope(series: list[tuple[float, float]]) -> float:
    """Least-squares slope of a series (units per minute)."""
    if len(series) < 2:
        return 0.0
    n = len(series)
    mx = sum(x for x, _ in series) / n
    my = sum(y for _, y in series) / n
    var = sum((x - mx) ** 2 for x, _ in series)
    return sum((x - mx) * (y - my) for x, y in series) / var if var else 0.0


def describe(name: str, series: list[tuple[float, float]], unit: str) -> str:
    """first / last / max and slope of a series, and the slope of its second half (growth that
    goes on after warm-up is what a leak looks like)."""
    if not series:
        return f"{name}: no samples"
    values = [y for _, y in series]
    return (
        f"{name:<18} first {values[0]:9.1f}  last {values[-1]:9.1f}  max {max(values):9.1f} {unit}"
        f"  slope {slope(series):+8.2f} {unit}/min"
        f"  (second half {slope(series[len(series) // 2 :]):+8.2f})"
    )


# --------------------------------------------------------------------------------- the end


async def drain(services: Services, seconds: float) -> dict[str, Any]:
    """Wait until the outbox holds nothing outstanding or pending (the proxy's health says)."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=services.proxy_url, timeout=5.0) as client:
        while True:
            try:
                health = (await client.get("/_dualwrite/health")).json()
                outbox = health.get("outbox") or {}
                if outbox.get("outstanding") == 0 and outbox.get("pending") == 0:
                    return dict(outbox)
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                return {"not drained": True}
            await asyncio.sleep(1.0)


async def ledger_totals(redis_url: str) -> dict[str, dict[str, int]]:
    """Per customer: intended (recorded), legacy accepted, meter accepted, from the ledger."""
    settings = Settings(redis={"url": redis_url, "key_prefix": PREFIX})
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        rows = await Ledger(client, KeySpace(PREFIX, settings.redis.shards)).rows()
    finally:
        await client.aclose()
    totals: dict[str, dict[str, int]] = {}
    for row in rows:
        mine = totals.setdefault(row.customer, Counter())
        mine["intended"] += row["quantity"]
        mine["legacy"] += row["legacy_accepted_qty"]
        mine["meter"] += row["meter_accepted_qty"]
        mine["legacy_expected"] += row["legacy_expected_qty"]
        mine["meter_expected"] += row["meter_expected_qty"]
    return totals


async def set_stages(redis_url: str, customers: list[Customer]) -> None:
    """Pin each customer to its stage."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = RedisFlagStore(client, KeySpace(PREFIX))
        for customer in customers:
            await store.set_override(customer.id, customer.stage, actor="soak", reason="soak")
    finally:
        await client.aclose()


def check_totals(
    customers: list[Customer], load: Load, ledger: dict[str, dict[str, int]], state: dict[str, Any]
) -> list[str]:
    """Every disagreement between the callers, the ledger and the stand-in (empty: exact).

    A customer's stage can change during the run (Redis down: the safe stage; the guard rolls back
    a customer whose legs differ), so each leg is held to what the ledger says it should hold:
    recorded == what callers were told, and on each path expected == accepted == Stripe's total.
    """
    problems = []
    for customer in customers:
        row = ledger.get(customer.id, {})
        pairs = {
            "recorded (ledger) vs told to callers": (
                row.get("intended", 0),
                load.intended[customer.id],
            ),
            "legacy: accepted vs expected": (row.get("legacy", 0), row.get("legacy_expected", 0)),
            "meter: accepted vs expected": (row.get("meter", 0), row.get("meter_expected", 0)),
            "legacy: stand-in vs ledger": (
                int(state["legacy_totals"].get(customer.item, 0)),
                row.get("legacy", 0),
            ),
            "meter: stand-in vs ledger": (
                int(state["meter_totals"].get(customer.id, {}).get(EVENT_NAME, 0)),
                row.get("meter", 0),
            ),
        }
        for name, (got, want) in pairs.items():
            if got != want:
                problems.append(f"{customer.id} ({customer.stage.value}): {name}: {got} != {want}")
    return problems


async def soak(args: argparse.Namespace) -> int:
    """Run the soak; returns the exit status."""
    directory = Path(tempfile.mkdtemp(prefix="dualwrite-soak-"))
    services = Services(directory, PrivateRedis(directory))
    try:
        services.start_backends()
        customers, price = await asyncio.to_thread(
            create_customers, services.standin_url, args.customers
        )
        await set_stages(services.redis.url, customers)
        services.start_dualwrite(price)
        if args.slowloris:
            services.start_slowloris(args.slowloris, args.minutes * 60)
        load, samples = Load(), Samples()
        faults: list[str] = []
        until = time.monotonic() + args.minutes * 60
        began = time.monotonic()
        await asyncio.gather(
            generate(services.proxy_url, customers, args.rate, until, load),
            fault_schedule(services, until, faults),
            sample(services, until + 30, samples),
        )
        loaded = time.monotonic() - began
        async with httpx.AsyncClient(timeout=5.0) as control:
            await control.post(services.standin_url + "/_standin/faults/clear")
        outbox = await drain(services, 180)
        ledger = await ledger_totals(services.redis.url)
        async with httpx.AsyncClient(timeout=10.0) as control:
            state = (await control.get(services.standin_url + "/_standin/state")).json()
        problems = check_totals(customers, load, ledger, state)
        print(
            f"soak: {loaded / 60:.1f} min of load, {args.rate:g} req/s, {len(customers)} customers"
        )
        print(
            f"requests: {load.sent} sent, {load.accepted} recorded, {load.retries} retries, "
            f"{load.given_up} given up, refused {dict(load.refused)}"
        )
        print("faults:", *faults, sep="\n  ")
        tally = services.slowloris_tally()
        if tally is not None:
            print(f"slowloris ({args.slowloris} connections held for the run): {json.dumps(tally)}")
        print(f"outbox at the end: {json.dumps(outbox)}")
        for name, series in sorted(samples.rss.items()):
            print(describe(f"RSS {name}", series, "MiB"))
        print(describe("Redis DBSIZE", samples.dbsize, "keys"))
        print(describe("keys without TTL", samples.persistent, "keys"))
        print(describe("Redis streams", samples.streams, "KiB"))
        sums: Counter[str] = Counter()
        for row in ledger.values():
            sums.update(row)
        print(
            f"totals: told to callers {sum(load.intended.values())}, ledger {dict(sums)}, "
            f"stand-in legacy {sum(int(v) for v in state['legacy_totals'].values())}, "
            f"stand-in meter {sum(int(v.get(EVENT_NAME, 0)) for v in state['meter_totals'].values())}"
        )
        if load.refused:
            problems.append(f"normal requests refused: {dict(load.refused)}")
        if problems or load.given_up:
            print("TOTALS DISAGREE:" if problems else "requests given up (outcome unknown)")
            for problem in problems:
                print("  " + problem)
            return 1
        print("totals exact: intended == ledger == stand-in, on both paths, for every customer")
        return 0
    finally:
        services.stop()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"logs kept in {directory}")


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    parser.add_argument("--customers", type=int, default=20, help="customers (default 20)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and Redis files")
    parser.add_argument(
        "--slowloris", type=int, default=0, help="slow connections held beside the load (0: none)"
    )
    args = parser.parse_args()
    if args.minutes <= 0 or args.minutes > 120 or args.rate <= 0 or args.rate > 500:
        parser.error("--minutes must be in (0, 120] and --rate in (0, 500]")
    if not 0 <= args.slowloris <= 20_000:
        parser.error("--slowloris must be in [0, 20000]")
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
