"""Shared fixtures: a real Redis server (each test under its own key prefix) and the Stripe stand-in."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from dualwrite.config import DEFAULT_REDIS_URL
from dualwrite.testing import RunningStandin, StripeStandin, serve_standin

REDIS_URL = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
START_REDIS_HINT = (
    "these tests need a real Redis server on {url} (set REDIS_URL to use another). Start one with:\n"
    "  redis-server --daemonize yes --port 6379 --save '' --appendonly no\n"
    "or run `bash .ci/run`, which starts one when none answers."
)


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


# ------------------------------------------------------------------------------ Stripe stand-in

STRIPE_KEY = "sk_test_dualwriteTests0000000000000001"


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
