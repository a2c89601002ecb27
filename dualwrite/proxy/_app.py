"""``ProxyApp``: the ASGI app behind ``dualwrite serve``, a drop-in Stripe API endpoint.

Routing is one string test per request: ``POST /v1/subscription_items/{si}/usage_records`` goes to
the interceptor, ``/_dualwrite/live``, ``/ready`` and ``/health`` are answered here
(``dualwrite.health``), ``/_dualwrite/admin/`` is the admin API
(``dualwrite.admin``), ``/metrics`` the Prometheus metrics (``dualwrite.metrics``), the rest of
``/_dualwrite/`` is the report page (``dualwrite.web``; each behind its own bearer token), and
everything else is streamed to the upstream untouched. The lifespan starts the engine (and with
it the outbox worker) and stops it at shutdown, when the worker finishes its batch and leaves
anything unfinished pending for another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from dualwrite._http import stripe_error
from dualwrite.admin import admin_app
from dualwrite.config import Settings
from dualwrite.durability import DurabilityGuard
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import DualwriteError
from dualwrite.health import HEALTH_PATH, PATHS, HealthCheck
from dualwrite.metrics import OutboxSampler, RequestObserver, metrics_app
from dualwrite.outbox import OutboxWorker
from dualwrite.proxy._items import ItemResolver
from dualwrite.proxy._pool import UpstreamPool
from dualwrite.proxy._upstream import Upstream, request_target
from dualwrite.proxy._usage import USAGE_PATH_RE, UsageInterceptor
from dualwrite.web import report_app

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_USAGE_BODY_BYTES",
    "HEALTH_PATH",
    "ProxyApp",
    "create_app",
    "create_proxy_app",
]

log = logging.getLogger("dualwrite.proxy")

#: The proxy's own endpoints live under this prefix, which Stripe's API never uses.
RESERVED_PREFIX = "/_dualwrite/"
#: Where the report page is mounted (everything under the prefix but health and the webhook path).
REPORT_ROOT = "/_dualwrite"
#: Where the admin API is mounted (``dualwrite.admin``, behind its own bearer token).
ADMIN_ROOT = "/_dualwrite/admin"
#: Prometheus metrics (``dualwrite.metrics``); Stripe's API has no such path.
METRICS_PATH = "/metrics"
#: The largest request body forwarded (Stripe's API bodies are small; files go to files.stripe.com).
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: The largest usage-record body read for interception (a real one is a few dozen bytes).
DEFAULT_MAX_USAGE_BODY_BYTES = 64 * 1024
_USAGE_SUFFIX = "/usage_records"


class ProxyApp:
    """Forwards Stripe API requests to ``settings.stripe.api_base`` and dual-writes usage records.

    Args:
        settings: the upstream, Redis, meters and item mappings.
        engine: an engine to share; whoever built it starts and closes it. By default the app
            builds one and starts it with the lifespan (or at the first usage request when the
            server runs no lifespan), and closes it at shutdown.
        max_body_bytes: larger request bodies get 413 (streamed bodies are cut off there).
        max_usage_body_bytes: the same for usage-record requests, which are read whole.
        clock: this host's clock (Stripe's, tracked against it, fixes a usage timestamp of now).
        access_log: log one ``dualwrite.access`` line per request (requests are counted in the
            metrics either way).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: DualWriteEngine | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_usage_body_bytes: int = DEFAULT_MAX_USAGE_BODY_BYTES,
        clock: Callable[[], float] = time.time,
        access_log: bool = False,
    ):
        self.settings = settings
        self.engine = engine or DualWriteEngine.from_settings(settings, clock=clock)
        self.max_body_bytes = max_body_bytes
        # Every reply's Date keeps the engine's view of Stripe's clock current.
        self.upstream = Upstream(settings.stripe, on_date=self.engine.writer.clock.observe)
        # The fast path's connections to the same upstream (``_fast``: forwarded requests as bytes).
        self.pool = UpstreamPool(settings.stripe)
        self.access_log = access_log
        stores = self.engine.stores
        self.items = ItemResolver(
            # The engine's read also keeps the item's billing period for the ledger.
            settings,
            redis=stores.redis,
            keys=stores.keys,
            lookup=self.engine,
        )
        self.usage = UsageInterceptor(
            self.engine,
            self.upstream,
            self.items,
            max_body=max_usage_body_bytes,
            legacy_api_version=settings.stripe.legacy_api_version,
        )
        self.report = report_app(settings, engine=self.engine)
        self.admin = admin_app(settings, engine=self.engine)
        self.metrics = metrics_app(settings, engine=self.engine)
        self.durability = DurabilityGuard(stores.redis, stores.keys, settings.redis)
        self._owns_engine = engine is None
        self.stopping = False
        """Set when shutdown begins: readiness answers 503 from then on."""
        self.checks = HealthCheck(
            role="proxy",
            watched=self,
            sampler=OutboxSampler.of(settings, self.engine),
            worker_expected=self._owns_engine and settings.outbox.run_in_process,
            key_needed=True,
            has_key=settings.stripe_api_key_value() is not None,
            spool=self.engine.spool,
            prepare=self._ensure_started,
        )
        # Stripe's error-report events are received only once a signing secret is configured.
        self._events_path = (
            settings.webhooks.path if settings.stripe_webhook_secret_value() else None
        )
        self._observed = RequestObserver(
            self._http, route_of=self.route_of, log_requests=access_log
        )

    @property
    def worker(self) -> OutboxWorker | None:
        """The engine's in-process outbox worker (None: not running)."""
        return self.engine.worker

    def route_of(self, method: str, path: str) -> str:
        """The route class of a request (a label of the request metrics)."""
        if method == "POST" and USAGE_PATH_RE.fullmatch(path):
            return "usage_record"
        if path == self.settings.webhooks.path:
            return "webhook"
        if path == METRICS_PATH:
            return "metrics"
        if path in PATHS:
            return "health"
        if path == ADMIN_ROOT or path.startswith(f"{ADMIN_ROOT}/"):
            return "admin"
        if path.startswith(RESERVED_PREFIX) or path == REPORT_ROOT:
            return "report"
        return "stripe"

    def forwards(self, method: str, path: str) -> bool:
        """Whether a request is streamed to the upstream untouched (``_http``'s routing, which
        the fast path asks before taking a request)."""
        if method == "POST" and path.endswith(_USAGE_SUFFIX) and USAGE_PATH_RE.fullmatch(path):
            return False
        if path in (self._events_path, self.settings.webhooks.path, METRICS_PATH):
            return False
        return not (path.startswith(RESERVED_PREFIX) or path == REPORT_ROOT)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._observed(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:  # websockets: Stripe's API has none
            await send({"type": "websocket.close", "code": 1003})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            path, raw_target = request_target(scope)
        except (ValueError, UnicodeDecodeError):
            response = stripe_error(400, "The request target is not a valid path.")
            await response(scope, receive, send)
            return
        if path.endswith(_USAGE_SUFFIX) and scope["method"] == "POST":
            match = USAGE_PATH_RE.fullmatch(path)
            if match is not None:
                await self._ensure_started()
                await self.usage(scope, receive, send, item=match["item"], raw_target=raw_target)
                return
        if path == self._events_path:  # Stripe's error-report events (late refusals)
            await self._ensure_started()
            await self.engine.late(scope, receive, send)
            return
        if path == self.settings.webhooks.path:
            # No signing secret: nothing to receive here (and no body is read).
            await stripe_error(404, f"Unrecognized request URL ({scope['method']}: {path}).")(
                scope, receive, send
            )
            return
        if path == METRICS_PATH:
            await self.metrics(scope, receive, send)
            return
        if path.startswith(RESERVED_PREFIX) or path == REPORT_ROOT:
            await self._own_endpoint(path, scope, receive, send)
            return
        await self.upstream.forward(
            scope, receive, send, raw_target=raw_target, max_body=self.max_body_bytes
        )

    async def _own_endpoint(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        if path == ADMIN_ROOT or path.startswith(f"{ADMIN_ROOT}/"):
            await self.admin({**scope, "path": path, "root_path": ADMIN_ROOT}, receive, send)
            return
        if path in PATHS:
            await self.checks(path, scope, receive, send)
            return
        # The report page, mounted as Starlette's Mount would: full path, root_path the prefix.
        report_scope = {**scope, "path": path, "root_path": REPORT_ROOT}
        await self.report(report_scope, receive, send)

    async def health(self) -> tuple[int, dict[str, Any]]:
        """The detailed health view (``dualwrite.health``): 503 when Redis does not answer."""
        return await self.checks.health()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except DualwriteError as exc:  # says what to fix: no traceback (the server logs it)
                    await self.aclose()
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                except Exception as exc:
                    log.exception("the proxy could not start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Check Redis's durability settings and watch for data loss (``dualwrite.durability``),
        then start the engine (and its outbox worker) if the app owns it; warn about a missing key.

        Raises:
            RedisEvictionError: Redis may evict keys and ``[redis] allow_eviction`` is off.
        """
        if self.settings.stripe_api_key_value() is None:
            log.warning(
                "STRIPE_API_KEY is not set: callers' requests are forwarded with their own keys, "
                "but shadow writes (written later by the outbox worker, which never sees a "
                "caller's key) will fail until it is set in the proxy's environment"
            )
        self.stopping = False
        await self.durability.start()
        await self._ensure_started()

    async def _ensure_started(self) -> None:
        if self._owns_engine:  # a shared engine is started and closed by whoever built it
            await self.engine.start_once()

    async def aclose(self) -> None:
        """Stop the engine's worker and close the engine (if the app built it) and the pool."""
        self.stopping = True
        await self.durability.aclose()
        if self._owns_engine:
            await self.engine.aclose()
        await self.upstream.aclose()
        await self.pool.aclose()


def create_proxy_app(
    settings: Settings,
    *,
    engine: DualWriteEngine | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_usage_body_bytes: int = DEFAULT_MAX_USAGE_BODY_BYTES,
    clock: Callable[[], float] = time.time,
) -> ProxyApp:
    """The proxy as an ASGI app (the arguments are ``ProxyApp``'s)."""
    return ProxyApp(
        settings,
        engine=engine,
        max_body_bytes=max_body_bytes,
        max_usage_body_bytes=max_usage_body_bytes,
        clock=clock,
    )


def create_app() -> ProxyApp:
    """Factory for ``uvicorn --factory dualwrite.proxy:create_app``: settings from
    ``DUALWRITE_CONFIG`` and the environment."""
    return ProxyApp(Settings.load())
