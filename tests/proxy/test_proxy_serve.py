"""``dualwrite serve`` in a process of its own: start-up, health, forwarding, SIGTERM; and the
uvicorn factory."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import httpx
import pytest
import uvloop
from anyio.abc import Process
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dualwrite.config import ProxySettings
from dualwrite.proxy import HEALTH_PATH, ProxyApp, RunningProxy, create_app, serve_proxy
from dualwrite.proxy._protocol import LimitedHttpToolsProtocol
from dualwrite.proxy._server import _config
from tests.conftest import STRIPE_KEY
from tests.proxy.test_proxy import proxy_settings
from tests.support import ScenarioBuilder

pytestmark = pytest.mark.anyio


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, redis_url: str, prefix: str, api_base: str) -> Path:
    """A minimal config file for the proxy."""
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nkey_prefix = "{prefix}"\n\n'
        f'[stripe]\napi_base = "{api_base}"\n\n'
        '[[meters]]\nevent_name = "api_requests"\n',
        encoding="utf-8",
    )
    return path


def clean_env() -> dict[str, str]:
    """The environment without dualwrite settings or a Stripe key (the file decides)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DUALWRITE_") and name != "STRIPE_API_KEY"
    }


async def read_all(process: Process) -> str:
    """Everything the process wrote to stderr (after it exited)."""
    assert process.stderr is not None
    chunks = [chunk async for chunk in process.stderr]
    return b"".join(chunks).decode(errors="replace")


class TestServeCommand:
    """The command runs uvicorn with the proxy, its worker inside, and stops cleanly on SIGTERM."""

    async def test_serve_forward_and_sigterm(self, tmp_path, redis_url, key_prefix, standin_url):
        """Health answers, calls are forwarded, a missing key is warned of, SIGTERM is graceful."""
        builder = ScenarioBuilder(standin_url, STRIPE_KEY)
        scenario = await builder.customer()
        await builder.aclose()
        config = write_config(tmp_path / "dualwrite.toml", redis_url, key_prefix, standin_url)
        port = free_port()
        command = [
            sys.executable,
            "-c",
            "from dualwrite.cli import main; main()",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--no-access-log",
        ]
        process = await anyio.open_process(command, env=clean_env())
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url) as client:
                with anyio.fail_after(20):
                    while True:  # polls: the server is another process
                        try:
                            if (await client.get(HEALTH_PATH)).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        assert process.returncode is None, await read_all(process)
                        await anyio.sleep(0.05)
                response = await client.get(
                    f"/v1/customers/{scenario.customer}",
                    headers={"Authorization": f"Bearer {STRIPE_KEY}"},
                )
                assert response.status_code == 200
                assert response.json()["id"] == scenario.customer
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                status = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        log = await read_all(process)
        # uvicorn re-raises the SIGTERM it caught once shutdown is complete (the Unix convention).
        assert status in (0, -signal.SIGTERM), log
        assert "STRIPE_API_KEY is not set" in log
        assert "Application shutdown complete" in log and "Finished server process" in log
        assert STRIPE_KEY not in log


class TestLifespanAndFactory:
    """The lifespan owns the engine's worker; the factory reads DUALWRITE_CONFIG."""

    async def test_worker_runs_with_the_server(self, redis_url, key_prefix, standin_url):
        """The outbox worker starts with the server and is stopped at shutdown."""
        with serve_proxy(proxy_settings(redis_url, key_prefix, standin_url)) as running:
            assert isinstance(running.app, ProxyApp)
            app = running.app
            assert app.engine.worker is not None
        assert app.engine.worker is None

    async def test_factory_reads_the_environment(
        self, tmp_path, monkeypatch, redis_url, key_prefix
    ):
        """``uvicorn --factory dualwrite.proxy:create_app`` builds the app from DUALWRITE_CONFIG."""
        config = write_config(tmp_path / "c.toml", redis_url, key_prefix, "http://127.0.0.1:9")
        monkeypatch.setenv("DUALWRITE_CONFIG", str(config))
        app = create_app()
        await app.aclose()
        assert app.settings.stripe.api_base == "http://127.0.0.1:9"
        assert app.settings.redis.key_prefix == key_prefix

    async def test_server_runs_httptools_on_uvloop(self, redis_url, key_prefix, standin_url):
        """The proxy's uvicorn parses HTTP with httptools (C, with the [proxy] limits) and runs on
        uvloop, not on h11 and asyncio's loop, which cost it about twice the CPU per forwarded
        call."""
        running = RunningProxy("127.0.0.1")
        config = _config(
            running,
            proxy_settings(redis_url, key_prefix, standin_url),
            host="127.0.0.1",
            port=0,
            quiet=True,
            access_log=False,
            graceful_seconds=1.0,
            app_options={},
        )
        config.load()
        assert isinstance(running.app, ProxyApp)
        await running.app.aclose()
        assert issubclass(config.http_protocol_class, LimitedHttpToolsProtocol)
        assert issubclass(config.http_protocol_class, HttpToolsProtocol)
        limits = config.http_protocol_class.limits  # max_connections fits the open-file limit
        assert limits.model_dump(exclude={"max_connections"}) == ProxySettings().model_dump(
            exclude={"max_connections"}
        )
        assert config.get_loop_factory() is uvloop.new_event_loop
