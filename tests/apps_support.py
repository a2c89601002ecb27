"""What the tests of the other Python apps share (the direct API, WSGI, the SDK hook, the examples):
a customer made or moved from synchronous code, the examples' environment, customers at every
stage, Stripe's totals read through the stand-in's summary endpoints, and gunicorn as a child."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
import stripe

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.outbox import OUTBOX_GROUP
from tests.support import (
    EVENT_NAME,
    LEGACY_VERSION,
    STRIPE_KEY,
    Scenario,
    ScenarioBuilder,
    cli_environment,
    set_stage,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
#: Which legs each stage writes: (legacy, meter).
LEGS = {
    Stage.LEGACY: (True, False),
    Stage.SHADOW: (True, True),
    Stage.PRIMARY: (True, True),
    Stage.METER: (False, True),
}


def make_scenario(standin_url: str) -> Scenario:
    """A customer on a legacy metered price, made through the SDK (from synchronous code)."""

    async def make() -> Scenario:
        async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
            return await builder.customer()

    return asyncio.run(make())


def put_at(settings: Settings, customer: str, stage: Stage) -> None:
    """Move ``customer`` to ``stage`` (through a short-lived engine, from synchronous code)."""

    async def run() -> None:
        engine = DualWriteEngine.from_settings(settings)
        try:
            await set_stage(engine, customer, stage)
        finally:
            await engine.aclose()

    asyncio.run(run())


def example_environment(
    redis_url: str, key_prefix: str, standin_url: str, **extra: str
) -> dict[str, str]:
    """The environment an example runs in: examples/dualwrite.toml, the test's Redis prefix, the
    stand-in (for dualwrite and for the app's own SDK), and the repository on the path."""
    return (
        dict(os.environ)
        | cli_environment(redis_url, key_prefix, standin_url)
        | {
            "DUALWRITE_CONFIG": str(EXAMPLES / "dualwrite.toml"),
            "STRIPE_API_BASE": standin_url,
            "PYTHONPATH": str(REPO),
        }
        | extra
    )


@dataclass
class Customer:
    """A customer of the shop, its stage, and the usage sent for it."""

    scenario: Scenario
    stage: Stage
    sent: int = 0

    @property
    def expected(self) -> tuple[int, int]:
        """(legacy, meter) totals Stripe must hold."""
        legacy, meter = LEGS[self.stage]
        return (self.sent if legacy else 0, self.sent if meter else 0)


@dataclass
class Shop:
    """Customers on a legacy metered price, ``per_stage`` of them at each stage."""

    customers: list[Customer] = field(default_factory=list)
    started: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, settings: Settings, standin_url: str, *, per_stage: int = 1) -> Shop:
        """Create the customers through the SDK and put them at their stages."""

        async def make() -> Shop:
            shop = cls()
            engine = DualWriteEngine.from_settings(settings)
            try:
                async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                    for stage in Stage:
                        for _ in range(per_stage):
                            scenario = await builder.customer(f"{stage.value} customer")
                            await set_stage(engine, scenario.customer, stage)
                            shop.customers.append(Customer(scenario, stage))
            finally:
                await engine.aclose()
            return shop

        return asyncio.run(make())

    @property
    def legacy_price(self) -> str:
        """The legacy metered price every customer is on."""
        return self.customers[0].scenario.legacy_price


def stripe_totals(standin_url: str, customer: Customer, since: int) -> tuple[int, int]:
    """(legacy, meter) totals as Stripe reports them: the item's usage record summary for the
    current period, and the meter's event summaries from ``since``."""
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": standin_url})
    scenario = customer.scenario
    response = client.raw_request(
        "get",
        f"/v1/subscription_items/{scenario.item}/usage_record_summaries",
        stripe_version=LEGACY_VERSION,
    )
    periods = json.loads(response.body)["data"]
    legacy = int(periods[0]["total_usage"]) if periods else 0
    now = int(time.time())
    summaries = client.v1.billing.meters.event_summaries.list(
        scenario.meter,
        {
            "customer": scenario.customer,
            "start_time": since - since % 60 - 60,
            "end_time": now - now % 60 + 360,
        },
    )
    meter = sum(summary.aggregated_value for summary in summaries.data)
    return legacy, int(meter)


def wait_for_totals(standin_url: str, shop: Shop, *, timeout: float = 60.0) -> dict[str, object]:
    """Wait until Stripe holds every customer's expected totals (the shadow legs are delivered
    by the apps' in-process workers); return what it holds, per customer, when it does or at
    the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        held = {
            customer.scenario.customer: stripe_totals(standin_url, customer, shop.started)
            for customer in shop.customers
        }
        wanted = {c.scenario.customer: c.expected for c in shop.customers}
        if held == wanted or time.monotonic() > deadline:
            return {"held": held, "wanted": wanted}
        time.sleep(0.25)


#: What a client sends again, with the same Idempotency-Key (Stripe's retryable statuses).
RETRYABLE = frozenset({409, 429, 500, 502, 503, 504})
RETRIES = 6


def send_usage(url: str, shop: Shop, *, per_customer: int, threads: int = 8) -> int:
    """POST ``per_customer`` usage requests for each customer to ``url``'s usage route, from
    ``threads`` threads; every 20th is sent again after its reply, with its Idempotency-Key (a
    client's retry), which must not count again, and a retryable refusal is retried with its key.
    Returns how many usage requests were sent (retries of refusals not counted)."""
    plan: list[tuple[Customer, int, str, int]] = []
    for index in range(per_customer):
        for number, customer in enumerate(shop.customers):
            quantity = 1 + (index * 7 + number) % 13
            customer.sent += quantity
            sends = 2 if index % 20 == 19 else 1
            plan.append((customer, quantity, f"{customer.scenario.customer}-{index}", sends))

    def post(chunk: list[tuple[Customer, int, str, int]]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for customer, quantity, key, sends in chunk:
                for _ in range(sends):
                    for attempt in range(RETRIES + 1):
                        response = http.post(
                            f"/api/usage/{customer.scenario.customer}",
                            json={
                                "subscription_item": customer.scenario.item,
                                "quantity": quantity,
                            },
                            headers={"Idempotency-Key": key},
                        )
                        # As a client should: a retryable refusal is sent again, same key.
                        if response.status_code not in RETRYABLE or attempt == RETRIES:
                            break
                        time.sleep(0.05 * 2**attempt)
                    assert response.status_code == 200, response.text
                    assert response.json()["recorded"] is True

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, [plan[start::threads] for start in range(threads)]))
    return sum(sends for *_, sends in plan)


def outbox_consumers(redis_url: str, key_prefix: str, settings: Settings) -> list[str]:
    """The names of the consumers of every outbox shard (``host-pid-suffix``)."""
    from dualwrite.keys import KeySpace

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        names: list[str] = []
        for shard in KeySpace(key_prefix, settings.redis.shards).all_shards():
            if client.exists(shard.outbox):
                names += [c["name"] for c in client.xinfo_consumers(shard.outbox, OUTBOX_GROUP)]
        return names
    finally:
        client.close()


def consumer_pid(name: str) -> int:
    """The process id in a consumer's name."""
    return int(name.rsplit("-", 2)[1])


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux ``/proc``)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


@dataclass
class Server:
    """A server child process listening on ``url``."""

    process: subprocess.Popen[bytes]
    url: str

    @property
    def workers(self) -> set[int]:
        """The worker processes gunicorn forked."""
        return children(self.process.pid)


@contextmanager
def gunicorn(
    app: str, environment: Mapping[str, str], *, workers: int, preload: bool = True
) -> Iterator[Server]:
    """``gunicorn`` serving ``app`` with sync workers on a free port; stopped with SIGTERM."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        str(workers),
        "--worker-class",
        "sync",
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "--graceful-timeout",
        "20",
        "--no-control-socket",  # gunicorn 25.1+: one control socket per user, shared otherwise
        *(["--preload"] if preload else []),
        app,
    ]
    process = subprocess.Popen(argv, cwd=REPO, env=dict(environment))
    try:
        wait_listening(port, process, expected_children=workers)
        yield Server(process, f"http://127.0.0.1:{port}")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_listening(
    port: int, process: subprocess.Popen[bytes], *, expected_children: int = 0
) -> None:
    """Wait until ``process`` listens on ``port`` (and has forked its workers)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"the server exited with status {process.returncode}"
            raise AssertionError(msg)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if len(children(process.pid)) >= expected_children:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    msg = f"the server did not listen on port {port} in time"
    raise AssertionError(msg)


def wait_until(condition: Callable[[], bool], *, timeout: float = 60.0, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in time"
        time.sleep(0.1)


__all__ = [
    "EVENT_NAME",
    "EXAMPLES",
    "REPO",
    "Customer",
    "Server",
    "Shop",
    "consumer_pid",
    "example_environment",
    "gunicorn",
    "make_scenario",
    "outbox_consumers",
    "put_at",
    "send_usage",
    "stripe_totals",
    "wait_for_totals",
    "wait_until",
]
