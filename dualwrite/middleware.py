"""``DualWriteMiddleware``: pure ASGI, wraps the user's app and dual-writes its usage routes.

A request matching a configured usage route is turned into a ``UsageEvent`` and recorded by the engine
*before* the app runs; the app then sees the outcome on ``request.state.dualwrite`` (its own usage-record
call is deleted: the middleware made the writes). A malformed usage request gets HTTP 400 with a
Stripe-style error body naming the field, and nothing is written. An authoritative write that Stripe
refuses returns Stripe's status and error to the caller, and the app is not called. Every other
request, streaming responses and websockets included, goes straight to the app untouched.

The middleware also handles the lifespan scope, so the engine's worker starts and stops with the app,
after Redis's durability settings are checked (an evicting ``maxmemory-policy`` fails the start),
and answers ``/_dualwrite/live``, ``/ready`` and ``/health`` under the app's own paths
(``dualwrite.health``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualwrite._http import failure_reply, read_body, stripe_error, unavailable, usage_error
from dualwrite.config import Settings
from dualwrite.durability import DurabilityGuard
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import ClientDisconnectedError, ConflictError, UsageInputError
from dualwrite.health import PATHS, HealthCheck
from dualwrite.metrics import OutboxSampler
from dualwrite.models import RecordOutcome
from dualwrite.outbox import OutboxWorker
from dualwrite.routes import RouteMatch, RouteTable, build_event

__all__ = ["STATE_KEY", "DualWriteMiddleware", "refusal", "stripe_error", "usage_error"]

log = logging.getLogger(__name__)

#: The key under ``request.state`` (``scope["state"]``) where the app finds the ``RecordOutcome``.
STATE_KEY = "dualwrite"


class DualWriteMiddleware:
    """Dual-writes the usage routes of the wrapped ASGI app.

    Args:
        app: the user's ASGI app (Starlette, FastAPI, anything ASGI).
        config: settings (default: ``Settings.load()``, i.e. ``DUALWRITE_CONFIG`` and the environment).
        engine: an engine to share; whoever built it starts and closes it. By default the middleware
            builds one from ``config``, starts it with the app's lifespan (or at the first usage
            request when the server runs no lifespan) and closes it at shutdown.
        clock: this host's clock, for the engine the middleware builds (Stripe's own clock,
            tracked against it, fixes the instant of a usage timestamp of ``now``).
        health: answer ``/_dualwrite/live``, ``/_dualwrite/ready`` and ``/_dualwrite/health``
            (below the app's root path); False leaves those paths to the app.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: Settings | None = None,
        engine: DualWriteEngine | None = None,
        clock: Callable[[], float] = time.time,
        health: bool = True,
    ):
        self.app = app
        self.settings = config or (engine.settings if engine else Settings.load())
        self.engine = engine or DualWriteEngine.from_settings(self.settings, clock=clock)
        self.routes = RouteTable(self.settings.routes)
        self._owns_engine = engine is None
        self._clock = clock
        stores = self.engine.stores
        self.durability = DurabilityGuard(stores.redis, stores.keys, self.settings.redis)
        # Stripe's error-report events are received here only once a signing secret is configured.
        self._events_path = (
            self.settings.webhooks.path if self.settings.stripe_webhook_secret_value() else None
        )
        self._keyless = self.engine.settings.stripe_api_key_value() is None
        self.stopping = False
        """Set when shutdown begins: readiness answers 503 from then on."""
        self.checks = HealthCheck(
            role="middleware",
            watched=self,
            sampler=OutboxSampler.of(self.settings, self.engine),
            worker_expected=self._owns_engine and self.settings.outbox.run_in_process,
            key_needed=bool(self.routes.routes),
            has_key=not self._keyless,
            spool=self.engine.spool,
            prepare=self._ensure_started,
        )
        self._health_paths = PATHS if health else frozenset()
        if self._keyless and self.routes.routes:
            log.warning(
                "STRIPE_API_KEY is not set: usage requests on the %d configured route(s) will be "
                "answered 503 and nothing recorded until it is set in the app's environment",
                len(self.routes.routes),
            )

    @property
    def worker(self) -> OutboxWorker | None:
        """The engine's in-process outbox worker (None: not running)."""
        return self.engine.worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = _route_path(scope)
            match = self.routes.match(scope["method"], path)
            if match is not None:
                await self._usage(match, scope, receive, send)
                return
            if path == self._events_path:
                await self.engine.late(scope, receive, send)
                return
            if path in self._health_paths:
                await self.checks(path, scope, receive, send)
                return
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.stopping = False
                await self._check_durability()
                await self._ensure_started()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)

    async def _check_durability(self) -> None:
        """Check Redis's settings and watch for data loss (``dualwrite.durability``); a refused
        start closes what the middleware opened."""
        if not self._owns_engine:  # whoever built a shared engine checks its Redis
            return
        try:
            await self.durability.start()
        except BaseException:
            await self.aclose()
            raise

    async def _ensure_started(self) -> None:
        if self._owns_engine:  # a shared engine is started and closed by whoever built it
            await self.engine.start_once()

    async def aclose(self) -> None:
        """Stop the engine's worker and close the engine if the middleware built it."""
        self.stopping = True
        await self.durability.aclose()
        if self._owns_engine:
            await self.engine.aclose()

    async def _usage(self, match: RouteMatch, scope: Scope, receive: Receive, send: Send) -> None:
        if self._keyless:
            # The caller learns nothing about the server's configuration; the log says what.
            log.error("usage request refused: STRIPE_API_KEY is not set")
            await unavailable()(scope, receive, send)
            return
        await self._ensure_started()
        limit = match.route.max_body_bytes
        try:
            body = await read_body(receive, limit)
        except ClientDisconnectedError:
            return  # an incomplete body records nothing, and nobody is left to answer
        if body is None:
            response = stripe_error(
                413,
                f"The request body is larger than {limit} bytes.",
                code="request_too_large",
            )
            await response(scope, receive, send)
            return
        try:
            event = await self.engine.event_at_now(
                lambda now: build_event(
                    match,
                    query_string=scope.get("query_string", b""),
                    headers=scope.get("headers", []),
                    body=body,
                    now=now,
                    items=self.settings.items,
                )
            )
            outcome = await self.engine.record(event)
        except (UsageInputError, ConflictError) as exc:
            await usage_error(exc)(scope, receive, send)
            return
        if not outcome.accepted:
            await refusal(outcome)(scope, receive, send)
            return
        scope.setdefault("state", {})[STATE_KEY] = outcome
        await self.app(scope, _replay(body, receive), send)


def _route_path(scope: Scope) -> str:
    """The path as the app's router sees it: without the ``root_path`` the app is mounted under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body to the app, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def refusal(outcome: RecordOutcome) -> JSONResponse:
    """Stripe's own status and error, for an authoritative write Stripe refused (the WSGI
    middleware's too); 503 when Stripe refused the server's own key."""
    failure = outcome.authoritative.failure
    if failure is None:  # pragma: no cover - a refused write always carries its failure
        return stripe_error(502, "Stripe refused the usage.", error_type="api_error")
    if failure.refused_key:
        # Stripe refused the server's own key: the caller's request is not at fault, and the
        # message (which names the key) is the server's business.
        log.error("Stripe refused the server's key: %s", failure.message)
        return unavailable()
    return failure_reply(failure)
