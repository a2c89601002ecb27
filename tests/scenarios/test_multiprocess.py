"""Many processes on one Redis: two ``dualwrite serve`` proxies and three ``dualwrite worker``
processes, the Stripe stand-in in a process of its own (``dualwrite stripe-standin``), traffic for
1,000 customers through both proxies, a flag change every proxy must see, and exact totals judged
by the oracle (``tests/oracle.py``): Stripe's summaries, read over HTTP from the stand-in's
process, and the ledger hold what each caller was told at the stage the test had set."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore
from dualwrite.models import Stage
from dualwrite.proxy import HEALTH_PATH
from tests.cluster_support import free_port_pair
from tests.conftest import STRIPE_KEY
from tests.oracle import Oracle
from tests.support import EVENT_NAME, Scenario, ScenarioBuilder

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CUSTOMERS = 1000
CONCURRENCY = 24
AUTH = {"Authorization": f"Bearer {STRIPE_KEY}"}


class Processes:
    """Child processes of the test, each stopped with SIGTERM (then SIGKILL) at the end."""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.directory = directory
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Run ``dualwrite <args>``; its output goes to ``<name>.log``."""
        log = (self.directory / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "dualwrite", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        """What a process printed so far."""
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> int:
        """SIGTERM one process and wait for its exit code."""
        process = self.running.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return -9

    def stop_all(self) -> None:
        """Stop whatever is still running."""
        for name in list(self.running):
            self.stop(name)


async def wait_until_up(url: str, name: str, processes: Processes) -> None:
    """Poll ``url`` until it answers 200 (fails with the process's log if it exits first)."""
    async with httpx.AsyncClient(timeout=2) as client:
        with anyio.fail_after(30):
            while True:  # polls: a child process starting up has nothing to await on
                if processes.running[name].poll() is not None:
                    pytest.fail(f"{name} exited:\n{processes.log(name)}", pytrace=False)
                try:
                    if (await client.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                await anyio.sleep(0.1)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The test's child processes (environment: the test key, a private spool)."""
    env = {
        **os.environ,
        "STRIPE_API_KEY": STRIPE_KEY,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "DUALWRITE_CONFIG": str(tmp_path / "dualwrite.toml"),
    }
    running = Processes(tmp_path, env)
    yield running
    running.stop_all()


@pytest.fixture
async def standin_process(processes: Processes) -> AsyncIterator[str]:
    """``dualwrite stripe-standin`` in its own process; yields its URL."""
    port = free_port_pair()
    processes.start("standin", "stripe-standin", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    await wait_until_up(f"{url}/_standin/state", "standin", processes)
    yield url


async def make_customers(url: str) -> tuple[list[Scenario], str]:
    """``CUSTOMERS`` customers on the legacy price, made through the SDK; and that price."""
    builder = ScenarioBuilder(url, STRIPE_KEY)
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(n: int) -> Scenario:
        async with limit:
            return await builder.customer(f"customer {n}")

    try:
        first = await builder.customer("customer 0")
        rest = await asyncio.gather(*(one(n) for n in range(1, CUSTOMERS)))
    finally:
        await builder.aclose()
    return [first, *rest], first.legacy_price


def write_config(path: Path, *, redis_url: str, prefix: str, standin: str, price: str) -> None:
    """The one config file every process reads."""
    path.write_text(
        f"""
[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
shards = 8

[stripe]
api_base = "{standin}"
timeout = 10.0

[flags]
# Only the change announcement can make a proxy see a new stage within this test.
cache_ttl = 600

[outbox]
run_in_process = false
block_ms = 100
backoff_base = 0.05
backoff_max = 0.5
claim_idle_seconds = 5.0

[limits]
legacy_per_second = 0

[[meters]]
event_name = "{EVENT_NAME}"
legacy_prices = ["{price}"]
"""
    )


async def send_usage(
    proxies: list[str],
    scenarios: list[Scenario],
    *,
    phase: str,
    quantity_of: dict[str, int],
    retries: list[int],
    oracle: Oracle,
) -> None:
    """One usage record per customer, alternating proxies; every reply must end as 200 (the
    statuses that were retried are appended to ``retries``), and the oracle is told so."""
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:

        async def one(n: int, scenario: Scenario) -> None:
            proxy = proxies[(n + (phase == "b")) % len(proxies)]
            quantity = quantity_of[scenario.customer]
            sent_at = int(time.time())  # the proxy stamps the usage: no timestamp is sent
            for attempt in range(5):
                # As Stripe's SDKs do: retry 409 / 429 / 5xx with the same key (a proxy that
                # lost its upstream connection says so with a 502); the key makes it exactly once.
                async with limit:
                    response = await client.post(
                        f"{proxy}/v1/subscription_items/{scenario.item}/usage_records",
                        data={"quantity": str(quantity)},
                        headers={"Idempotency-Key": f"{phase}-{scenario.customer}"},
                    )
                if response.status_code not in (409, 429) and response.status_code < 500:
                    break
                retries.append(response.status_code)
                await anyio.sleep(0.1 * 2**attempt)
            assert response.status_code == 200, response.text
            oracle.tell(scenario, quantity, timestamp=sent_at, accepted=True)

        await asyncio.gather(*(one(n, scenario) for n, scenario in enumerate(scenarios)))


async def test_two_proxies_three_workers_exact_totals(
    processes, standin_process, redis_url, key_prefix, tmp_path
):
    """1,000 customers through two proxy processes, delivered by three worker processes:
    a change of the default stage reaches both proxies at once, and Stripe's summaries and the
    ledger hold, per customer and leg, what the oracle was told (the first usage at ``legacy``,
    the default stage, the second at ``shadow``)."""
    scenarios, price = await make_customers(standin_process)
    config = tmp_path / "dualwrite.toml"
    write_config(
        config, redis_url=redis_url, prefix=key_prefix, standin=standin_process, price=price
    )
    proxies = []
    for n in range(2):
        port = free_port_pair()
        processes.start(f"proxy{n}", "serve", "--port", str(port), "--no-access-log")
        proxies.append(f"http://127.0.0.1:{port}")
    for n in range(3):
        processes.start(f"worker{n}", "worker", "--name", f"worker-{n}")
    for n, url in enumerate(proxies):
        await wait_until_up(url + HEALTH_PATH, f"proxy{n}", processes)

    first = {s.customer: 1 + n % 7 for n, s in enumerate(scenarios)}
    second = {s.customer: 10 + n % 5 for n, s in enumerate(scenarios)}
    retried: list[int] = []
    oracle = Oracle()
    for scenario in scenarios:
        oracle.set_stage(scenario, Stage.LEGACY)  # the default stage, cached by both proxies
    started = time.monotonic()
    await send_usage(
        proxies, scenarios, phase="a", quantity_of=first, retries=retried, oracle=oracle
    )

    settings = Settings.load(config)
    engine = DualWriteEngine.from_settings(settings)
    await engine.start(worker=False)
    try:
        await RedisFlagStore(engine.redis, engine.keys).set_default(Stage.SHADOW, actor="tests")
        for scenario in scenarios:
            oracle.set_stage(scenario, Stage.SHADOW)
        await send_usage(
            proxies, scenarios, phase="b", quantity_of=second, retries=retried, oracle=oracle
        )
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(120):
                while True:  # polls: three other processes deliver the shadow writes
                    depth = await engine.outbox.depth()
                    if depth.outstanding == 0 and depth.pending == 0:
                        break
                    await anyio.sleep(0.2)
            state = (await client.get(f"{standin_process}/_standin/state")).json()
        elapsed = time.monotonic() - started
        rows = await engine.ledger.rows()
        # A proxy that missed the change would have written no meter event for its customers.
        await oracle.assert_ledger(engine.ledger)
        builder = ScenarioBuilder(standin_process, STRIPE_KEY)
        try:
            await oracle.assert_stripe(builder.client, slack=60)
        finally:
            await builder.aclose()
    finally:
        await engine.aclose()

    ledger: dict[str, dict[str, int]] = {}
    for row in rows:
        totals = ledger.setdefault(row.customer, {})
        for name, value in row.counters.items():
            totals[name] = totals.get(name, 0) + value
    meter_totals = state["meter_totals"]
    legacy_totals = state["legacy_totals"]
    assert depth.dead == 0
    for scenario in scenarios:
        customer = scenario.customer
        assert legacy_totals[scenario.item] == first[customer] + second[customer]
        # A proxy that missed the change would have written no meter event for its customers.
        assert meter_totals[customer][EVENT_NAME] == second[customer]
        assert ledger[customer]["legacy_accepted_qty"] == first[customer] + second[customer]
        assert ledger[customer]["meter_accepted_qty"] == second[customer]

    delivered = {}
    for n in range(3):
        assert processes.stop(f"worker{n}") == 0
        delivered[n] = processes.log(f"worker{n}")
    for n in range(2):
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it.
        assert processes.stop(f"proxy{n}") in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in processes.log(f"proxy{n}")
    # Every worker took a share of the 1,000 shadow writes.
    for n, log in delivered.items():
        found = re.search(r"stopped: (\d+) accepted", log)
        assert found and int(found.group(1)) > 0, f"worker {n} delivered nothing:\n{log}"
    print(  # the figure the README quotes (run with -s to see it)
        json.dumps({"requests": 2 * CUSTOMERS, "seconds": round(elapsed, 1), "retried": retried})
    )
