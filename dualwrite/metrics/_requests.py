"""``RequestObserver``: each HTTP request counted by route class and status, timed, and logged as
one access line.

The access line is a ``dualwrite.access`` log record whose fields (``method``, ``path``: the path
template, never the ids in it, ``route``, ``status``, ``duration_ms``) are ``extra=`` fields, so
``log_format = "json"`` writes them as JSON fields; as text it reads ``GET /v1/customers/{id} 200
12.5 ms``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dualwrite.instruments import count_request

__all__ = ["RequestObserver", "path_template"]

access_log = logging.getLogger("dualwrite.access")

#: A path segment that names one object (``cus_123``, ``si_ABC``, ``1234``): shown as ``{id}``.
_ID_SEGMENT = re.compile(r"^(?:[A-Za-z]{1,12}_[A-Za-z0-9_]+|\d+|[0-9a-f]{16,})$")
RouteOf = Callable[[str, str], str]
"""The route class of a request, from its method and path."""


def path_template(path: str) -> str:
    """``path`` with every id segment replaced by ``{id}`` (``/v1/customers/{id}``)."""
    return "/".join("{id}" if _ID_SEGMENT.match(part) else part for part in path.split("/"))


class RequestObserver:
    """Pure ASGI: counts, times and (when ``log_requests``) logs each HTTP request of ``app``.

    Args:
        app: the observed app.
        route_of: the route class of a request (a small, fixed set: it is a metric label).
        log_requests: write one ``dualwrite.access`` line per request.
    """

    def __init__(self, app: ASGIApp, *, route_of: RouteOf, log_requests: bool = False) -> None:
        self._app = app
        self._route_of = route_of
        self._log = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app fails before answering

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, observed)
        finally:
            seconds = time.perf_counter() - started
            method, path = scope["method"], scope["path"]
            route = self._route_of(method, path)
            count_request(route, status, seconds)
            if self._log:
                template = path_template(path)
                access_log.info(
                    "%s %s %d %.1f ms",
                    method,
                    template,
                    status,
                    seconds * 1000,
                    extra={
                        "method": method,
                        "path": template,
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 3),
                    },
                )
