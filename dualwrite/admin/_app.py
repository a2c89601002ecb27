"""``admin_app()``: the admin API as a Starlette app, behind ``BearerGate``.

``dualwrite serve`` serves it under ``/_dualwrite/admin/``; any Starlette or FastAPI app can mount
it (``Mount("/_dualwrite/admin", admin_app(settings))``). ``/openapi.json`` describes it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dualwrite._bearer import BearerGate
from dualwrite._http import stripe_error
from dualwrite.admin._api import AdminContext, Endpoint, openapi, routes
from dualwrite.admin._cutover import CUTOVER_ENDPOINTS
from dualwrite.admin._flags import FLAG_ENDPOINTS
from dualwrite.admin._reconcile import RECONCILE_ENDPOINTS
from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.flags import RedisFlagStore
from dualwrite.stores import Stores

__all__ = ["DEFAULT_ENDPOINTS", "OPENAPI_PATH", "AdminApp", "admin_app"]

#: What the admin API serves (a new group of operations adds its tuple here).
DEFAULT_ENDPOINTS: tuple[Endpoint, ...] = FLAG_ENDPOINTS + CUTOVER_ENDPOINTS + RECONCILE_ENDPOINTS
OPENAPI_PATH = "/openapi.json"


def _version() -> str:
    try:
        return version("dualwrite")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0"


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    messages = {
        404: f"Unrecognized request URL ({request.method}: {request.url.path}).",
        405: f"{request.method} is not allowed on {request.url.path}.",
    }
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal error."
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else None
    return stripe_error(status, messages.get(status, str(detail)), headers=headers)


class AdminApp:
    """The admin API as an ASGI app, behind the ``DUALWRITE_ADMIN_TOKEN`` bearer token.

    Args:
        settings: Redis, the flags' settings and the admin token.
        engine: an engine whose Redis connection to share (the proxy's); whoever built it closes
            it. Without one the app opens its own connection, closed by ``aclose()`` or at the end
            of the app's lifespan (a mounted app gets no lifespan: call ``aclose()`` from the
            outer app's).
        endpoints: the operations to serve (default: ``DEFAULT_ENDPOINTS``).
        token: the bearer token, instead of the settings' one.
        clock: Unix time (schedules are resolved against it).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: DualWriteEngine | None = None,
        endpoints: Iterable[Endpoint] = DEFAULT_ENDPOINTS,
        token: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The engine's stores (closed by whoever built it), else stores of its own.
        self._owned = engine is None
        self._stores = (
            engine.stores if engine is not None else Stores.open(settings, max_connections=16)
        )
        redis, keys = self._stores.redis, self._stores.keys
        self.endpoints = tuple(endpoints)
        context = AdminContext(
            settings=settings,
            redis=redis,
            keys=keys,
            flags=RedisFlagStore(redis, keys, clock=clock),
            engine=engine,
            clock=clock,
        )
        api_version = _version()

        async def schema(request: Request) -> Response:
            root: str = request.scope.get("root_path", "")
            return JSONResponse(openapi(self.endpoints, server=root, version=api_version))

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await self.aclose()

        api = Starlette(
            routes=[Route(OPENAPI_PATH, schema), *routes(self.endpoints, context)],
            exception_handlers={HTTPException: _http_error},
            lifespan=lifespan,
        )
        self._app = BearerGate(
            api,
            token if token is not None else settings.admin_token_value(),
            variable="DUALWRITE_ADMIN_TOKEN",
            realm="dualwrite admin API",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def aclose(self) -> None:
        """Close the Redis connection the app opened (none when it shares an engine's)."""
        if self._owned:
            await self._stores.aclose()

    async def __aenter__(self) -> AdminApp:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def admin_app(
    settings: Settings,
    *,
    engine: DualWriteEngine | None = None,
    endpoints: Iterable[Endpoint] = DEFAULT_ENDPOINTS,
    token: str | None = None,
) -> AdminApp:
    """The admin API as an ASGI app (the arguments are ``AdminApp``'s)."""
    return AdminApp(settings, engine=engine, endpoints=endpoints, token=token)
