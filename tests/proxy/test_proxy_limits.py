"""The proxy under attack: its ``[proxy]`` limits over raw sockets (431, 408, 503, keep-alive), a
slowloris of 2,000 connections against a proxy whose open-file limit is 1,024 while normal callers
are served, the webhook receiver's body cap, and unmapped usage counted only once Stripe accepted it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from anyio.abc import SocketStream
from pydantic import SecretStr

from dualwrite.config import Settings
from dualwrite.keys import KeySpace
from dualwrite.late_refusals import MAX_EVENT_BYTES
from dualwrite.proxy import HEALTH_PATH, RunningProxy, _items as items_module, serve_proxy
from dualwrite.proxy._items import OTHER_ITEMS
from tests.conftest import STRIPE_KEY, SettingsFactory
from tests.proxy.test_proxy import proxy_settings
from tests.proxy.test_proxy_serve import clean_env, free_port, write_config
from tests.support import dualwrite_command

pytestmark = pytest.mark.anyio

BENCH = Path(__file__).resolve().parents[2] / "bench"
#: Small limits, so that each is reached quickly.
LIMITS = {
    "max_header_bytes": 4096,
    "max_headers": 20,
    "header_timeout": 0.5,
    "body_timeout": 0.5,
    "max_connections": 64,
    "keep_alive_timeout": 1,
}


@contextmanager
def proxy_with(settings: Settings) -> Iterator[RunningProxy]:
    """The proxy served by uvicorn in a thread, as ``dualwrite serve`` serves it."""
    with serve_proxy(settings) as running:
        yield running


@pytest.fixture
def limited(standin_settings: SettingsFactory) -> Iterator[RunningProxy]:
    """A proxy with ``LIMITS``."""
    with proxy_with(standin_settings(proxy=LIMITS)) as running:
        yield running


async def connect(proxy: RunningProxy) -> SocketStream:
    """A raw connection to the proxy."""
    return await anyio.connect_tcp("127.0.0.1", proxy.port)


async def until_closed(stream: SocketStream, *, within: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``within`` s)."""
    received = b""
    with anyio.fail_after(within):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return received


def status_of(reply: bytes) -> int | None:
    """The status code of a raw HTTP reply (None when nothing was sent)."""
    return int(reply[9:12]) if reply.startswith(b"HTTP/1.1 ") else None


def request(path: str = HEALTH_PATH, *headers: str, close: bool = True) -> bytes:
    """A raw GET with ``headers`` (``Name: value`` each)."""
    lines = [f"GET {path} HTTP/1.1", "Host: proxy", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send_all(proxy: RunningProxy, data: bytes, *, within: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read the reply until the server closes."""
    stream = await connect(proxy)
    try:
        await stream.send(data)
        return await until_closed(stream, within=within)
    finally:
        await stream.aclose()


class TestHeaderLimits:
    """Headers over ``max_header_bytes`` or ``max_headers`` get 431 and are not forwarded."""

    async def test_large_header_gets_431(self, limited: RunningProxy):
        """A header of 5,000 bytes (limit 4,096) gets 431; one of 3,000 is served."""
        refused = await send_all(limited, request(HEALTH_PATH, f"X-Big: {'a' * 5000}"))
        assert status_of(refused) == 431
        assert b"invalid_request_error" in refused and b"connection: close" in refused
        served = await send_all(limited, request(HEALTH_PATH, f"X-Big: {'a' * 3000}"))
        assert status_of(served) == 200

    async def test_endless_header_is_cut_off(self, limited: RunningProxy):
        """A header that never ends gets 431 once past the limit, while it is still arriving:
        the proxy never holds more than the limit of it."""
        stream = await connect(limited)
        try:
            await stream.send(b"GET / HTTP/1.1\r\nHost: proxy\r\nX-Endless: ")
            sent = 0
            with pytest.raises((anyio.BrokenResourceError, ConnectionResetError, OSError)):
                while sent < 32 * 1024 * 1024:
                    await stream.send(b"a" * 1024)
                    sent += 1024
                    await anyio.lowlevel.checkpoint()
            assert sent < 1024 * 1024
        finally:
            await stream.aclose()

    async def test_endless_header_reply_is_431(self, limited: RunningProxy):
        """The caller that stops sending past the limit reads 431."""
        reply = await send_all(limited, b"GET / HTTP/1.1\r\nHost: p\r\nX-Endless: " + b"a" * 8000)
        assert status_of(reply) == 431

    async def test_too_many_headers_get_431(self, limited: RunningProxy):
        """25 header fields (limit 20) get 431; 15 are served."""
        many = [f"X-H{index}: {index}" for index in range(25)]
        assert status_of(await send_all(limited, request(HEALTH_PATH, *many))) == 431
        assert status_of(await send_all(limited, request(HEALTH_PATH, *many[:15]))) == 200


class TestTimeouts:
    """A request not received in time gets 408; a silent connection is closed."""

    async def test_slow_headers_get_408(self, limited: RunningProxy):
        """Half a request's headers, then nothing: 408 after the header timeout, closed."""
        stream = await connect(limited)
        try:
            await stream.send(b"GET /_dualwrite/health HTTP/1.1\r\nHost: proxy\r\n")
            started = time.monotonic()
            reply = await until_closed(stream, within=5)
        finally:
            await stream.aclose()
        assert status_of(reply) == 408
        assert time.monotonic() - started >= LIMITS["header_timeout"] * 0.9

    async def test_silent_connection_is_closed(self, limited: RunningProxy):
        """A connection that sends nothing is closed, with no reply, after the header timeout."""
        stream = await connect(limited)
        try:
            assert await until_closed(stream, within=5) == b""
        finally:
            await stream.aclose()

    async def test_slow_body_gets_408(self, limited: RunningProxy, standin):
        """Headers promising 100 bytes, then 10: 408 after the body timeout; nothing reaches
        Stripe."""
        before = len(standin.requests)
        stream = await connect(limited)
        try:
            await stream.send(
                b"POST /v1/customers HTTP/1.1\r\nHost: proxy\r\nContent-Length: 100\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\nname=slow&"
            )
            reply = await until_closed(stream, within=5)
        finally:
            await stream.aclose()
        assert status_of(reply) == 408
        assert len(standin.requests) == before

    async def test_keep_alive_timeout(self, limited: RunningProxy):
        """An idle keep-alive connection is closed after ``keep_alive_timeout`` (1 s)."""
        stream = await connect(limited)
        try:
            await stream.send(request(HEALTH_PATH, close=False))
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += await stream.receive()
            assert status_of(reply) == 200
            started = time.monotonic()
            await until_closed(stream, within=3)
            assert time.monotonic() - started >= 0.9
        finally:
            await stream.aclose()


class TestConnectionCap:
    """Past ``max_connections`` a new caller takes the place of the one waiting longest for its
    headers; when every connection has a request in progress, it gets 503."""

    async def test_new_caller_takes_the_place_of_the_slowest(self, standin_settings):
        """With 8 slow connections (cap 8), a new caller is served at once, and the oldest slow
        connection gets 503."""
        limits = {**LIMITS, "max_connections": 8, "header_timeout": 30}
        with proxy_with(standin_settings(proxy=limits)) as proxy:
            slow = [await connect(proxy) for _ in range(8)]
            try:
                for stream in slow:
                    await stream.send(b"GET / HTTP/1.1\r\nHost: slow\r\n")
                await anyio.sleep(0.1)
                assert status_of(await send_all(proxy, request())) == 200
                evicted = await until_closed(slow[0], within=5)
                assert status_of(evicted) == 503 and b"retry-after: 1" in evicted
            finally:
                for stream in slow:
                    await stream.aclose()

    async def test_busy_connections_leave_503(self, standin_settings, standin):
        """8 requests in progress (cap 8: Stripe answers slowly): a 9th connection gets 503 with
        Retry-After at once."""
        limits = {**LIMITS, "max_connections": 8, "body_timeout": 30}
        standin.latency_seconds = 1.0
        with proxy_with(standin_settings(proxy=limits)) as proxy:
            busy = [await connect(proxy) for _ in range(8)]
            try:
                for stream in busy:
                    await stream.send(
                        request("/v1/customers", f"Authorization: Bearer {STRIPE_KEY}")
                    )
                await anyio.sleep(0.3)
                refused = await send_all(proxy, request(), within=1)
                assert status_of(refused) == 503 and b"retry-after: 1" in refused
                assert status_of(await until_closed(busy[0], within=10)) == 200
            finally:
                for stream in busy:
                    await stream.aclose()


def serve_with_open_files(
    config: Path, port: int, open_files: int, log: Path
) -> subprocess.Popen[bytes]:
    """``dualwrite serve`` in a process whose open-file limit (soft and hard) is ``open_files``."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    with log.open("wb") as handle:
        return subprocess.Popen(
            dualwrite_command(
                "serve", "--config", str(config), "--port", str(port), "--no-access-log"
            ),
            env={**clean_env(), "STRIPE_API_KEY": STRIPE_KEY},
            stdout=handle,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )


async def wait_up(url: str, process: subprocess.Popen[bytes]) -> None:
    """Wait until the proxy answers its health check."""
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(30):
            while True:
                assert process.poll() is None, "the proxy exited (see its log)"
                try:
                    await client.get(url + HEALTH_PATH, timeout=1)
                    return
                except httpx.HTTPError:
                    await anyio.sleep(0.1)


class TestSlowloris:
    """2,000 slow connections against a proxy limited to 1,024 open files: normal callers are
    still served (before the limits, 1,100 left none served)."""

    async def test_normal_callers_served_during_slowloris(
        self, tmp_path, redis_url, key_prefix, standin_url
    ):
        """Every one of 30 normal requests, made while the slowloris runs, gets its answer."""
        config = write_config(tmp_path / "dw.toml", redis_url, key_prefix, standin_url)
        port = free_port()
        log = tmp_path / "proxy.log"
        process = serve_with_open_files(config, port, 1024, log)
        url = f"http://127.0.0.1:{port}"
        slowloris = [sys.executable, str(BENCH / "_slowloris.py"), "127.0.0.1", str(port), "2000"]
        try:
            await wait_up(url, process)
            async with await anyio.open_process([*slowloris, "12"]) as attack:
                await anyio.sleep(3)  # the 2,000 are connected and holding
                answers = await normal_calls(url, count=30, spacing=0.2)
                assert attack.stdout is not None
                out = b"".join([chunk async for chunk in attack.stdout])
            tally = json.loads(out)
        finally:
            process.terminate()
            process.wait(timeout=30)
        assert answers == [200] * 30, (answers, log.read_text()[-3000:])
        assert tally["opened"] >= 2000
        assert "accept" not in log.read_text().lower()  # never out of descriptors


async def normal_calls(url: str, *, count: int, spacing: float) -> list[Any]:
    """``count`` health requests, one every ``spacing`` seconds, each on a new connection; their
    statuses (or the error's name)."""
    answers: list[Any] = []
    for _ in range(count):
        async with httpx.AsyncClient() as client:
            try:
                answers.append((await client.get(url + HEALTH_PATH, timeout=5)).status_code)
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)
        await anyio.sleep(spacing)
    return answers


# ----------------------------------------------------------------------- the webhook receiver


async def post_partially(proxy: RunningProxy, path: str, *, declared: int, sent: int) -> bytes:
    """POST ``path`` declaring ``declared`` body bytes and sending ``sent``; the reply (the server
    must answer without the rest)."""
    stream = await connect(proxy)
    try:
        await stream.send(
            f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Length: {declared}\r\n"
            "Content-Type: application/json\r\n\r\n".encode()
        )
        with contextlib.suppress(anyio.BrokenResourceError):
            for _ in range(sent // 65536):
                await stream.send(b"x" * 65536)
        return await until_closed(stream, within=5)
    finally:
        await stream.aclose()


class TestWebhookReceiver:
    """The events endpoint never reads a body it does not need."""

    async def test_no_secret_means_404_without_reading(self, standin_settings):
        """No STRIPE_WEBHOOK_SECRET: 404 at once for a 400 MiB POST, none of it read."""
        settings = standin_settings(proxy={**LIMITS, "body_timeout": 30})
        with proxy_with(settings) as proxy:
            reply = await post_partially(
                proxy, settings.webhooks.path, declared=400 * 1024 * 1024, sent=1024 * 1024
            )
        assert status_of(reply) == 404

    async def test_body_capped_before_reading(self, standin_settings):
        """With a secret, a body over MAX_EVENT_BYTES gets 413 as soon as it passes the cap."""
        settings = standin_settings(proxy={**LIMITS, "body_timeout": 30}).model_copy(
            update={"stripe_webhook_secret": SecretStr("whsec_test_limits")}
        )
        with proxy_with(settings) as proxy:
            reply = await post_partially(
                proxy, settings.webhooks.path, declared=400 * 1024 * 1024, sent=4 * MAX_EVENT_BYTES
            )
        assert status_of(reply) == 413
        assert f"at most {MAX_EVENT_BYTES} bytes".encode() in reply


# ------------------------------------------------------------------ unmapped usage, counted


def unmapped_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The proxy's "forwarded, not dual-written" lines."""
    return [r.getMessage() for r in caplog.records if "not dual-written" in r.getMessage()]


class TestUnmappedCounting:
    """Unmapped usage is counted only once Stripe accepted it, in a capped set, logged sparingly."""

    @pytest.fixture
    def proxy(self, redis_url, key_prefix, standin_url) -> Iterator[RunningProxy]:
        """A proxy whose meter maps no price (every item is unmapped)."""
        with proxy_with(proxy_settings(redis_url, key_prefix, standin_url)) as running:
            yield running

    async def test_anonymous_callers_write_nothing(self, proxy, redis_client, key_prefix, caplog):
        """200 usage requests with a made-up key, Stripe-Account and random 2 KB item ids: Stripe
        refuses them all (401), so nothing is counted, and at most one line is logged."""
        keys = KeySpace(key_prefix)
        with caplog.at_level(logging.WARNING, logger="dualwrite.proxy"):
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                for _ in range(200):
                    item = "si_" + secrets.token_hex(1024)
                    response = await client.post(
                        f"/v1/subscription_items/{item}/usage_records",
                        data={"quantity": "1"},
                        headers={
                            "Authorization": "Bearer sk_test_madeUpKey0000000000000000",
                            "Stripe-Account": "acct_madeup",
                        },
                    )
                    assert response.status_code == 401
        assert await redis_client.exists(keys.items_unmapped) == 0
        assert len(unmapped_warnings(caplog)) <= 1

    async def test_count_is_capped_and_the_line_rate_limited(
        self, proxy, builder, redis_client, key_prefix, caplog, monkeypatch
    ):
        """Five items Stripe accepted usage for, with a cap of three: three counted by name, two
        together; one warning line for the five."""
        monkeypatch.setattr(items_module, "UNMAPPED_ITEMS_MAX", 3)
        scenarios = [await builder.customer(f"unmapped {index}") for index in range(5)]
        with caplog.at_level(logging.WARNING, logger="dualwrite.proxy"):
            async with httpx.AsyncClient(
                base_url=proxy.url, headers={"Authorization": f"Bearer {STRIPE_KEY}"}
            ) as client:
                for scenario in scenarios:
                    response = await client.post(
                        f"/v1/subscription_items/{scenario.item}/usage_records",
                        data={"quantity": "2"},
                        headers={"Stripe-Account": "acct_connected"},
                    )
                    assert response.status_code == 200
        counts = await redis_client.hgetall(KeySpace(key_prefix).items_unmapped)
        assert counts == {
            **{scenario.item: "1" for scenario in scenarios[:3]},
            OTHER_ITEMS: "2",
        }
        assert len(unmapped_warnings(caplog)) == 1
