"""Shared fixtures: a real Redis server (each test under its own key prefix), the Stripe stand-in,
and the check of every call a stand-in answers against Stripe's published spec."""

from __future__ import annotations

import collections
import os
import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import redis
import redis.asyncio as aioredis

from dualwrite.config import DEFAULT_REDIS_URL, Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.testing import (
    RedisServerError,
    RedisServerProcess,
    RunningStandin,
    StripeStandin,
    serve_standin,
)
from stripe_standin.checking import SpecChecker, install
from tests.cluster_support import LocalCluster
from tests.support import STRIPE_KEY, ScenarioBuilder, make_settings

__all__ = ["STRIPE_KEY", "SettingsFactory"]

#: ``standin_settings``: this test's settings with the given sections (``make_settings``).
SettingsFactory = Callable[..., Settings]


def _worker_database(url: str) -> str:
    """Under pytest-xdist (``-n``), each worker on a database of its own, numbered after the
    configured one: tests that run the demo share its one key prefix, and must not meet."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if not worker.startswith("gw"):
        return url
    parsed = urllib.parse.urlsplit(url)
    database = int(parsed.path.strip("/") or 0) + 1 + int(worker[2:])
    return urllib.parse.urlunsplit(parsed._replace(path=f"/{database}"))


# Hypothesis fails an example slower than 200 ms by default: an absolute time, which a loaded
# machine (or a test run on every core) exceeds now and then. These tests judge results, not speed.
hypothesis.settings.register_profile("dualwrite", deadline=None)
hypothesis.settings.load_profile("dualwrite")

REDIS_URL = _worker_database(os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
START_REDIS_HINT = (
    "these tests need a real Redis server on {url} (set REDIS_URL to use another). Start one with:\n"
    "  redis-server --daemonize yes --port 6379 --save '' --appendonly no\n"
    "or run `bash .ci/run`, which starts one when none answers."
)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No dualwrite, Redis or Stripe variable of the caller's shell reaches the test."""
    for name in list(os.environ):
        if name.startswith("DUALWRITE_") or name in {"REDIS_URL", "STRIPE_API_KEY"}:
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _private_spool(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test spools (Redis-down commits) into its own directory, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio is asyncio-only: never run the async tests under trio."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a live Redis server; fails (never skips) with a how-to when none answers."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(START_REDIS_HINT.format(url=REDIS_URL) + f"\n({exc})", pytrace=False)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real three-master Redis Cluster on loopback for the session (``tests/cluster_support.py``)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        cluster.stop()
        pytest.fail(f"could not start the test Redis Cluster: {exc}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards (never FLUSHDB)."""
    prefix = f"dwtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.unlink(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the test Redis, decoding replies to ``str``."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


# ------------------------------------------------------------------- Stripe's spec, every call

_SPEC_CHECKER = pytest.StashKey[SpecChecker]()
_SPEC_TOTALS: dict[str, collections.Counter[str]] = {
    "checked": collections.Counter(),
    "uncovered": collections.Counter(),
}


@pytest.fixture(autouse=True)
def stripe_spec(request: pytest.FixtureRequest) -> Iterator[SpecChecker]:
    """Every request any stand-in receives during the test, and every reply it sends, is checked
    against Stripe's published spec (``stripe_standin.checking``); a violation fails the test.
    A test that sends a bad request on purpose wraps it in ``expect_invalid_requests()``; a fuzzer
    whose garbage reaches the stand-in is marked ``stripe_spec_unchecked_requests(reason)``
    (its replies are still checked)."""
    marker = request.node.get_closest_marker("stripe_spec_unchecked_requests")
    reason = None if marker is None else str(marker.kwargs.get("reason") or marker.args[0])
    checker = SpecChecker(excuse_requests=reason)
    previous = install(checker)
    request.node.stash[_SPEC_CHECKER] = checker
    yield checker
    install(previous)
    _SPEC_TOTALS["checked"].update(checker.checked)
    _SPEC_TOTALS["uncovered"].update(checker.uncovered)
    if checker.violations:  # calls answered during teardown
        pytest.fail(checker.report(), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test itself (not its teardown) for the violations its body caused."""
    result = yield
    checker = item.stash.get(_SPEC_CHECKER, None)
    if checker is not None and checker.violations:
        report = checker.report()
        checker.clear()
        pytest.fail(report, pytrace=False)
    return result


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its spec-check totals to the controller, which prints them."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["stripe_spec"] = {name: dict(counts) for name, counts in _SPEC_TOTALS.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The controller adds up what each pytest-xdist worker checked (``pytest_sessionfinish``)."""
    totals = getattr(node, "workeroutput", {}).get("stripe_spec", {})
    for name, counts in totals.items():
        _SPEC_TOTALS[name].update(counts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many calls were checked against Stripe's spec, and which the spec does not cover."""
    checked, uncovered = _SPEC_TOTALS["checked"], _SPEC_TOTALS["uncovered"]
    if not checked and not uncovered:
        return
    terminalreporter.write_sep("-", "Stripe spec check (stripe_standin.checking)")
    terminalreporter.write_line(
        f"checked against the vendored spec: {checked['request']} requests, "
        f"{checked['reply']} replies; calls the spec does not describe:"
    )
    for key, count in sorted(uncovered.items()):
        terminalreporter.write_line(f"  {count:6d}  {key}")


# ------------------------------------------------------------------------------ Stripe stand-in


@pytest.fixture(scope="session")
def standin_server() -> Iterator[RunningStandin]:
    """One stand-in server (a real socket) for the session; each test swaps in a fresh state."""
    with serve_standin(StripeStandin(api_keys=[STRIPE_KEY])) as running:
        yield running


@pytest.fixture
def standin(standin_server: RunningStandin) -> StripeStandin:
    """A fresh stand-in (empty state, no faults) served at ``standin_url``."""
    fresh = StripeStandin(api_keys=[STRIPE_KEY])
    standin_server.swap(fresh)
    return fresh


@pytest.fixture
def standin_url(standin_server: RunningStandin, standin: StripeStandin) -> str:
    """The base URL of the stand-in."""
    return standin_server.url


@pytest.fixture
def standin_settings(redis_url: str, key_prefix: str, standin_url: str) -> SettingsFactory:
    """Makes this test's settings (its key prefix, the stand-in and its key) with more sections."""

    def make(**sections: Any) -> Settings:
        return make_settings(
            redis_url=redis_url,
            prefix=key_prefix,
            api_base=standin_url,
            api_key=STRIPE_KEY,
            **sections,
        )

    return make


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """This test's settings: its own key prefix, the stand-in, fast retries (modules override it)."""
    return standin_settings()


@pytest.fixture
async def builder(standin_url: str) -> AsyncIterator[ScenarioBuilder]:
    """Creates customers with legacy subscriptions on the stand-in through the SDK."""
    async with ScenarioBuilder(standin_url, STRIPE_KEY) as made:
        yield made


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[DualWriteEngine]:
    """An engine on ``settings`` without a background worker: tests deliver explicitly."""
    engine = DualWriteEngine.from_settings(settings)
    await engine.start(worker=False)
    yield engine
    await engine.aclose()


# ------------------------------------------------------------------- a Redis the tests may restart


class OwnRedis(RedisServerProcess):
    """A redis-server process of the test's own, on a free port, that the test may stop and start."""

    def __init__(self, directory: Path, *, appendonly: bool):
        super().__init__(directory, appendfsync="always" if appendonly else None)
        self.appendonly = appendonly

    def start(self) -> None:
        """Start the server and wait until it answers (the test fails when it does not)."""
        try:
            super().start()
        except RedisServerError as exc:
            pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis of this test's own (appendonly, so a restart keeps its data), started."""
    server = OwnRedis(tmp_path, appendonly=True)
    server.start()
    yield server
    server.stop()
