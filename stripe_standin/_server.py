"""Serving the stand-in on a real socket: in a background thread for tests, or blocking for the CLI."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from stripe_standin._errors import StandinError
from stripe_standin._standin import StripeStandin

__all__ = ["RunningStandin", "run_standin", "serve_app", "serve_standin"]

GRACEFUL_SHUTDOWN = 2
"""Seconds uvicorn waits for in-flight replies when stopping."""
STARTUP_TIMEOUT = 10.0
"""Seconds a server may take to start listening."""
_ANY_ADDRESS = {"", "0.0.0.0", "::"}


class RunningStandin:
    """A stand-in listening on a socket; ``swap`` puts another stand-in behind the same server."""

    __slots__ = ("_standin", "host", "port")

    def __init__(self, standin: StripeStandin, host: str, port: int = 0) -> None:
        self._standin = standin
        self.host = host
        self.port = port

    @property
    def standin(self) -> StripeStandin:
        """The stand-in now being served."""
        return self._standin

    @property
    def url(self) -> str:
        """The base URL to give a Stripe SDK (``http://127.0.0.1:PORT``)."""
        return _base_url(self.host, self.port)

    def swap(self, standin: StripeStandin) -> None:
        """Serve ``standin`` from now on (fresh state without restarting the server, e.g. one
        server per test session); replies the previous one was holding back are released."""
        previous, self._standin = self._standin, standin
        standin._wakeup.reopen()
        if previous is not standin:
            previous._wakeup.close()

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._standin.app(scope, receive, send)


def _config(
    app: ASGIApp, host: str, port: int, *, quiet: bool, lifespan: bool = False, date: bool = True
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        interface="asgi3",
        host=host,
        port=port,
        http="auto",  # httptools when installed (much less CPU than h11)
        ws="none",
        lifespan="on" if lifespan else "off",
        access_log=not quiet,
        log_level="warning" if quiet else "info",
        # Tests must not have uvicorn reconfigure the process's logging.
        log_config=None if quiet else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        date_header=date,  # the stand-in sends its own clock's Date, as Stripe sends Stripe's
    )


def _base_url(host: str, port: int) -> str:
    host = "127.0.0.1" if host in _ANY_ADDRESS else host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


@contextmanager
def _in_thread(server: uvicorn.Server, failure: Exception) -> Iterator[int]:
    """Run ``server`` in a daemon thread until the block ends; yield the port it listens on."""
    thread = threading.Thread(target=server.run, name="stripe-standin", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=STARTUP_TIMEOUT)
            raise failure
        time.sleep(0.005)
    try:
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT + GRACEFUL_SHUTDOWN)


@contextmanager
def _serving(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    what: str,
    on_stop: Callable[[], None],
    lifespan: bool = False,
    date: bool = True,
) -> Iterator[int]:
    """Run ``app`` with uvicorn in a background thread; yield the port it listens on."""
    server = uvicorn.Server(_config(app, host, port, quiet=True, lifespan=lifespan, date=date))
    failure = StandinError(f"{what} could not start listening on {host}:{port}")
    with _in_thread(server, failure) as bound:
        try:
            yield bound
        finally:
            on_stop()


@contextmanager
def serve_standin(
    standin: StripeStandin, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningStandin]:
    """Run ``standin`` with uvicorn in a background thread; ``port=0`` picks a free port."""
    running = RunningStandin(standin, host)
    standin._wakeup.reopen()

    # The stand-in served at the end (``swap`` may have changed it) releases its held replies.
    def stop() -> None:
        running.standin._wakeup.close()

    with _serving(
        running._asgi, host, port, what="the Stripe stand-in", on_stop=stop, date=False
    ) as bound:
        running.port = bound
        yield running


@contextmanager
def serve_app(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, lifespan: bool = False
) -> Iterator[str]:
    """Run any ASGI app (a webhook receiver for the stand-in's event destinations, say) with
    uvicorn in a background thread, as ``serve_standin`` does; yield its base URL. With
    ``lifespan``, the app's startup and shutdown run in the server's own event loop."""
    with _serving(
        app, host, port, what="the app", on_stop=lambda: None, lifespan=lifespan
    ) as bound:
        yield _base_url(host, bound)


def run_standin(standin: StripeStandin, host: str = "127.0.0.1", port: int = 12111) -> None:
    """Serve ``standin`` in the foreground until interrupted (``dualwrite stripe-standin``)."""
    uvicorn.Server(_config(standin.app, host, port, quiet=False, date=False)).run()
