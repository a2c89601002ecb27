"""Another language, unchanged: the official stripe-node SDK, run with node, through the proxy.

The npm package is installed by ``npm ci`` from ``tests/proxy/node/package-lock.json`` into
``tests/proxy/node/node_modules`` (git-ignored), once, and reused while its version matches. node and
npm are required: without them these tests fail and say how to get them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.models import Stage
from dualwrite.proxy import RunningProxy, record_id, serve_proxy
from tests.conftest import STRIPE_KEY
from tests.proxy.test_proxy import eventually, proxy_settings
from tests.support import EVENT_NAME, LEGACY_VERSION, Scenario, ScenarioBuilder, set_stage

pytestmark = pytest.mark.anyio

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "usage.cjs"
NODE_HINT = (
    "the Node SDK test needs node (20 or later) and npm on PATH; install Node.js "
    "(e.g. `apt-get install nodejs npm`, or from https://nodejs.org) and run the tests again"
)


def _pinned_version() -> str:
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    return str(lock["packages"]["node_modules/stripe"]["version"])


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with the pinned stripe-node installed next to the test script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(NODE_HINT, pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    if int(version.stdout.strip().lstrip("v").split(".")[0]) < 20:
        pytest.fail(f"{NODE_HINT} (found node {version.stdout.strip()})", pytrace=False)
    installed = NODE_DIR / "node_modules" / "stripe" / "package.json"
    current = json.loads(installed.read_text())["version"] if installed.exists() else None
    if current != _pinned_version():
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            pytest.fail(
                f"`npm ci` in tests/proxy/node failed:\n{result.stderr[-3000:]}", pytrace=False
            )
    return node


@pytest.fixture
async def customers(standin_url: str) -> AsyncIterator[dict[Stage, Scenario]]:
    """A legacy and a primary customer on the legacy metered price."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    yield {stage: await builder.customer() for stage in (Stage.LEGACY, Stage.PRIMARY)}
    await builder.aclose()


@pytest.fixture
def settings(
    redis_url: str, key_prefix: str, standin_url: str, customers: dict[Stage, Scenario]
) -> Settings:
    """Proxy settings mapping the legacy price to the meter."""
    price = customers[Stage.LEGACY].legacy_price
    return proxy_settings(redis_url, key_prefix, standin_url, legacy_price=price)


@pytest.fixture
def proxy(settings: Settings) -> Iterator[RunningProxy]:
    """The proxy on a real socket."""
    with serve_proxy(settings) as running:
        yield running


async def run_node(node: str, proxy: RunningProxy, scenario: Scenario, key: str) -> dict[str, Any]:
    """Run the stripe-node script for one item; its JSON output."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PROXY_HOST": proxy.host,
        "PROXY_PORT": str(proxy.port),
        "STRIPE_KEY": STRIPE_KEY,
        "ITEM": scenario.item,
        "CUSTOMER": scenario.customer,
        "LEGACY_VERSION": LEGACY_VERSION,
        "IDEMPOTENCY_KEY": key,
    }
    result = await anyio.run_process([node, str(SCRIPT)], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()
    output: dict[str, Any] = json.loads(result.stdout)
    return output


class TestStripeNode:
    """stripe-node with host/port/protocol set to the proxy, and nothing else changed."""

    async def test_usage_records_and_reads(self, node, proxy, settings, customers, standin):
        """Legacy gets Stripe's record, primary ours, retries the same; reads work; legs once."""
        engine = DualWriteEngine.from_settings(settings)
        for stage, scenario in customers.items():
            await set_stage(engine, scenario.customer, stage)
        await engine.aclose()

        legacy = await run_node(node, proxy, customers[Stage.LEGACY], "node-legacy")
        primary = await run_node(node, proxy, customers[Stage.PRIMARY], "node-primary")

        [stripe_record] = standin.usage_records(customers[Stage.LEGACY].item)
        assert legacy["record"]["id"] == stripe_record["id"] == legacy["retried"]["id"]
        assert primary["record"] == primary["retried"]
        assert primary["record"]["id"] == record_id("node-primary")
        assert primary["record"]["object"] == "usage_record"
        assert primary["record"]["quantity"] == 11
        assert primary["requestId"].startswith("req_dw_")
        for run, stage in ((legacy, Stage.LEGACY), (primary, Stage.PRIMARY)):
            assert run["customer"] == {"id": customers[stage].customer, "object": "customer"}

        primary_item, primary_customer = (
            customers[Stage.PRIMARY].item,
            customers[Stage.PRIMARY].customer,
        )
        await eventually(lambda: standin.legacy_total(primary_item) == 11)
        assert standin.meter_total(primary_customer, EVENT_NAME) == 11
        assert standin.legacy_total(customers[Stage.LEGACY].item) == 11
        assert standin.meter_total(customers[Stage.LEGACY].customer, EVENT_NAME) == 0
