"""Serving the proxy with uvicorn: in the foreground (``dualwrite serve``) or in a background thread.

The app is built inside the server's event loop (uvicorn's factory mode), so its Redis and aiohttp
pools belong to the loop that uses them. The lifespan is on: it starts the engine and its outbox
worker, and on SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to
``graceful_seconds``), then runs the lifespan shutdown, which stops the worker; outbox entries it
had not finished stay pending and another worker claims them.

The server's HTTP protocol is uvicorn's httptools one with the ``[proxy]`` limits
(``dualwrite.proxy._protocol``: header size and count, time to receive headers and body,
connections, keep-alive), and ``run_proxy`` raises the process's open-file limit to fit the
connections (or lowers the connection cap, with a warning, when the hard limit is lower).

The server parses HTTP with httptools and runs on uvloop (where uvloop exists: not on Windows),
rather than uvicorn's pure-Python h11 and asyncio's loop: with aiohttp upstream, that halves the
proxy's CPU per forwarded call (``bench/proxy_overhead.py``). ``dualwrite serve
--no-access-log`` saves a log line per request on top.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from dualwrite.config import ProxySettings, Settings
from dualwrite.exceptions import DualwriteError
from dualwrite.logging import LogFormat, log_config
from dualwrite.proxy._app import DEFAULT_MAX_BODY_BYTES, ProxyApp
from dualwrite.proxy._fast import fast_protocol
from dualwrite.proxy._protocol import limited_protocol
from dualwrite.server_thread import serve_in_thread

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no resource module (nor RLIMIT_NOFILE)
    resource = None  # type: ignore[assignment]

__all__ = ["HTTP_IMPLEMENTATION", "LOOP_IMPLEMENTATION", "RunningProxy", "run_proxy", "serve_proxy"]

#: uvicorn's HTTP/1.1 implementation for the proxy (a C parser).
HTTP_IMPLEMENTATION = "httptools"
#: uvicorn's event loop for the proxy: uvloop, a dependency wherever it exists.
LOOP_IMPLEMENTATION = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"

_ANY_ADDRESS = {"", "0.0.0.0", "::"}
#: Descriptors kept free beside the callers' connections and the pools (Redis's, two to Stripe).
FD_SPARE = 64
#: The Redis pool of one process (``open_redis``'s default).
_REDIS_POOL = 256

log = logging.getLogger("dualwrite.proxy")


class RunningProxy:
    """A proxy listening on a socket (``serve_proxy``)."""

    __slots__ = ("app", "host", "port")

    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host
        self.port = port
        self.app: ProxyApp | None = None

    @property
    def url(self) -> str:
        """The base URL to give a Stripe SDK (``http://127.0.0.1:PORT``)."""
        host = "127.0.0.1" if self.host in _ANY_ADDRESS else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def _log_config(log_format: LogFormat = "text") -> dict[str, Any]:
    """uvicorn's logging, with dualwrite's own warnings printed the same way (``json``: every
    line a JSON object, ``dualwrite.logging``)."""
    if log_format == "json":
        return log_config("json")
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["dualwrite"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _config(
    running: RunningProxy,
    settings: Settings,
    *,
    host: str,
    port: int,
    quiet: bool,
    access_log: bool,
    graceful_seconds: float,
    app_options: dict[str, Any],
) -> uvicorn.Config:
    def factory() -> ProxyApp:
        running.app = ProxyApp(settings, **app_options)
        return running.app

    limits = fit_connections(settings)
    # The fast path relays forwarded requests itself; the rest goes to the app as before.
    protocol = fast_protocol(limits, running) if limits.fast_path else limited_protocol(limits)
    return uvicorn.Config(
        factory,
        factory=True,
        interface="asgi3",
        host=host,
        port=port,
        lifespan="on",
        ws="none",
        # httptools, with the [proxy] limits (uvicorn's own has none on headers or slow callers).
        http=protocol,
        timeout_keep_alive=settings.proxy.keep_alive_timeout,
        loop=LOOP_IMPLEMENTATION,
        # The app writes its own access lines (path templates, durations: ``dualwrite.access``).
        access_log=False,
        # Stripe's own Server and Date headers are passed through; uvicorn must not add its own.
        server_header=False,
        date_header=False,
        log_level="warning" if quiet else "info",
        # Tests must not have uvicorn reconfigure the process's logging.
        log_config=None if quiet else _log_config(settings.log_format),
        timeout_graceful_shutdown=int(graceful_seconds),
    )


def fit_connections(settings: Settings) -> ProxySettings:
    """``[proxy]`` with a connection cap the process can hold beside its own pools (Redis, and
    Stripe twice: the upstream and the writer): the open-file limit is raised, up to the hard
    limit, to fit; when it cannot go that high the cap is lowered, with a warning (past the cap
    callers get 503, never a refused accept)."""
    limits = settings.proxy
    if resource is None:  # pragma: no cover - Windows
        return limits
    reserve = _REDIS_POOL + 2 * settings.stripe.max_connections + FD_SPARE
    wanted = limits.max_connections + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return limits
    fitted = max(16, soft - reserve)
    log.warning(
        "the open-file limit (%d, hard %s) holds %d caller connections beside the Redis and "
        "Stripe pools, not [proxy] max_connections = %d: past %d the oldest connections still "
        "waiting for headers make room, else callers get 503 (raise the limit: ulimit -n, "
        "LimitNOFILE=)",
        soft,
        hard,
        fitted,
        limits.max_connections,
        fitted,
    )
    return limits.model_copy(update={"max_connections": fitted})


def run_proxy(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    access_log: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    graceful_seconds: float = 30.0,
) -> None:
    """Serve the proxy in the foreground until SIGINT or SIGTERM (``dualwrite serve``)."""
    running = RunningProxy(host, port)
    config = _config(
        running,
        settings,
        host=host,
        port=port,
        quiet=False,
        access_log=access_log,
        graceful_seconds=graceful_seconds,
        app_options={"max_body_bytes": max_body_bytes, "access_log": access_log},
    )
    uvicorn.Server(config).run()


@contextmanager
def serve_proxy(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    graceful_seconds: float = 2.0,
    **app_options: Any,
) -> Iterator[RunningProxy]:
    """Run the proxy with uvicorn in a background thread (tests, benchmarks); ``port=0`` picks a
    free port. ``app_options`` go to ``ProxyApp``.

    Raises:
        DualwriteError: the server did not start listening.
    """
    running = RunningProxy(host)
    server = uvicorn.Server(
        _config(
            running,
            settings,
            host=host,
            port=port,
            quiet=True,
            access_log=False,
            graceful_seconds=graceful_seconds,
            app_options=app_options,
        )
    )
    failure = DualwriteError(f"the dualwrite proxy could not start listening on {host}:{port}")
    with serve_in_thread(
        server, name="dualwrite-proxy", failure=failure, grace=graceful_seconds
    ) as bound:
        running.port = bound
        yield running
