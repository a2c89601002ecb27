"""WSGI: ``DualWriteMiddleware`` for Flask, Django or any WSGI app, and ``DualWriteDjangoMiddleware``.

The same ``[[routes]]`` and the same behaviour as the ASGI middleware (``dualwrite.middleware``),
whose pieces this module reuses rather than copies: the route table, ``build_event``, and the
error and refusal replies. A request matching a usage route becomes a ``UsageEvent`` recorded
*before* the app runs; the app finds the ``RecordOutcome`` at ``environ["dualwrite"]``
(``request.environ["dualwrite"]`` in Flask and Django) and the body as sent. Bad input gets a 400
with Stripe's error shape naming the field and writes nothing; Stripe refusing the authoritative
write returns Stripe's status and error, and the app is not called. Every other request goes to the
app untouched: its response iterable is returned as is, so streaming is unchanged.

The engine runs on a ``SyncRecorder`` (an event loop thread), started at the first usage request
of each process, so under a pre-fork server (gunicorn, uWSGI) each worker process starts its own
outbox worker after the fork, never the master before it. ``start()`` starts it eagerly (e.g.
from gunicorn's ``post_fork`` hook).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message

from dualwrite._http import stripe_error, usage_error
from dualwrite.config import Settings
from dualwrite.exceptions import ConflictError, DualwriteError, UsageInputError
from dualwrite.health import LIVE_PATH, PATHS, HealthCheck
from dualwrite.metrics import OutboxSampler
from dualwrite.middleware import refusal
from dualwrite.models import RecordOutcome
from dualwrite.recorder import Recorder, SyncRecorder
from dualwrite.routes import RouteMatch, RouteTable, build_event

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from dualwrite.durability import DurabilityGuard
    from dualwrite.outbox import OutboxWorker

__all__ = ["ENVIRON_KEY", "DualWriteDjangoMiddleware", "DualWriteMiddleware"]

#: The WSGI environ key (``request.environ[...]``) where the app finds the ``RecordOutcome``.
ENVIRON_KEY: Final = "dualwrite"
#: The largest body of a Stripe event pushed to the webhook path that is read.
MAX_EVENT_BODY_BYTES: Final = 1024 * 1024
_READ_CHUNK = 64 * 1024

log = logging.getLogger(__name__)


class _UsageGate:
    """What both WSGI front doors share: match a request, make its event, record it."""

    def __init__(self, settings: Settings, recorder: SyncRecorder, clock: Callable[[], float]):
        self.settings = settings
        self.recorder = recorder
        self.routes = RouteTable(settings.routes)
        self._clock = clock

    def record(
        self,
        match: RouteMatch,
        *,
        query_string: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> RecordOutcome | JSONResponse:
        """The outcome of an accepted usage request, or the reply to send instead of the app's."""
        try:
            event = build_event(
                match,
                query_string=query_string,
                headers=headers,
                body=body,
                now=int(self._clock()),
                items=self.settings.items,
            )
            outcome = self.recorder.record_event(event)
        except (UsageInputError, ConflictError) as exc:
            return usage_error(exc)
        if not outcome.accepted:
            return refusal(outcome)
        return outcome


class DualWriteMiddleware:
    """Dual-writes the usage routes of the wrapped WSGI app (Flask: ``app.wsgi_app =
    DualWriteMiddleware(app.wsgi_app, ...)``; Django: wrap ``get_wsgi_application()``).

    Args:
        app: the user's WSGI app.
        config: settings (default: ``Settings.load()``, i.e. ``DUALWRITE_CONFIG`` and the
            environment).
        recorder: a ``SyncRecorder`` to share (whoever built it closes it); by default the
            middleware makes one, closed with the process.
        clock: where "now" comes from (tests).
        health: answer ``/_dualwrite/live``, ``/_dualwrite/ready`` and ``/_dualwrite/health``;
            False leaves those paths to the app.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        config: Settings | None = None,
        recorder: SyncRecorder | None = None,
        clock: Callable[[], float] = time.time,
        health: bool = True,
    ):
        self.app = app
        self.settings = config or (recorder.settings if recorder else Settings.load())
        self.recorder = recorder or SyncRecorder(config=self.settings, clock=clock)
        self._owns_recorder = recorder is None
        self._gate = _UsageGate(self.settings, self.recorder, clock)
        # Stripe's error-report events are received here only once a signing secret is configured.
        self._events_path = (
            self.settings.webhooks.path if self.settings.stripe_webhook_secret_value() else None
        )
        self._probes = _Probes(self.recorder, key_needed=bool(self._gate.routes.routes))
        self._health_paths = PATHS if health else frozenset()
        if self.settings.stripe_api_key_value() is None and self._gate.routes.routes:
            log.warning(
                "STRIPE_API_KEY is not set: usage requests on the %d configured route(s) will be "
                "refused and nothing recorded until it is set in the app's environment",
                len(self._gate.routes.routes),
            )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = _route_path(environ)
        match = self._gate.routes.match(environ["REQUEST_METHOD"], path)
        if match is not None:
            return self._usage(match, environ, start_response)
        if path == self._events_path:
            return self._events(environ, start_response)
        if path in self._health_paths:
            status, headers, content = self._probes.answer(path, environ["REQUEST_METHOD"])
            start_response(_status_line(status), headers)
            return [content]
        return self.app(environ, start_response)

    def start(self) -> None:
        """Start the engine and its outbox worker in this process now (e.g. in gunicorn's
        ``post_fork`` hook) rather than at the first usage request."""
        self.recorder.start()

    def close(self) -> None:
        """Stop this process's outbox worker and close the engine, if the middleware made the
        recorder (a shared one is closed by whoever made it)."""
        if self._owns_recorder:
            self.recorder.close()

    def _usage(
        self, match: RouteMatch, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        limit = match.route.max_body_bytes
        body = _read_body(environ, limit)
        if isinstance(body, JSONResponse):
            return _respond(body, start_response)
        result = self._gate.record(
            match,
            query_string=environ.get("QUERY_STRING", "").encode("latin-1"),
            headers=_headers(environ),
            body=body,
        )
        if isinstance(result, JSONResponse):
            return _respond(result, start_response)
        environ[ENVIRON_KEY] = result
        environ["wsgi.input"] = io.BytesIO(body)  # the app reads the body as it was sent
        environ["CONTENT_LENGTH"] = str(len(body))
        return self.app(environ, start_response)

    def _events(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Stripe's pushed error-report events, handed to the engine's (ASGI) receiver."""
        body = _read_body(environ, MAX_EVENT_BODY_BYTES)
        if isinstance(body, JSONResponse):
            return _respond(body, start_response)
        scope = {
            "type": "http",
            "method": environ["REQUEST_METHOD"],
            "path": _route_path(environ),
            "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
            "headers": _headers(environ),
        }
        status, headers, content = self.recorder.run(
            lambda recorder: _asgi_exchange(recorder.engine.late, scope, body)
        )
        start_response(_status_line(status), headers)
        return [content]


class _Probes:
    """The health paths of one WSGI process (``dualwrite.health``'s rules for the middleware),
    checked on its recorder's loop."""

    def __init__(self, recorder: SyncRecorder, *, key_needed: bool):
        self._recorder = recorder
        self._key_needed = key_needed

    @property
    def worker(self) -> OutboxWorker | None:
        """The process's outbox worker."""
        return self._recorder.outbox_worker

    @property
    def durability(self) -> DurabilityGuard | None:
        """The process's durability checks."""
        return self._recorder.durability

    @property
    def stopping(self) -> bool:
        """Whether the recorder was closed."""
        return self._recorder.closed

    def answer(self, path: str, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body of the reply to a probe of ``path``."""
        scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
        if not self._recorder.closed:
            try:
                return self._recorder.run(lambda recorder: self._check(recorder, path, scope))
            except DualwriteError:  # closed meanwhile
                pass
        # A closed recorder has no loop to check on: the process is stopping.
        if path == LIVE_PATH:
            return 200, _JSON, b'{"status":"ok"}'
        body = {"status": "not_ready", "role": "middleware", "blocking": ["stopping"]}
        return 503, _JSON, json.dumps(body).encode()

    async def _check(
        self, recorder: Recorder, path: str, scope: dict[str, Any]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        settings = self._recorder.settings
        checks = HealthCheck(
            role="middleware",
            watched=self,
            sampler=OutboxSampler.of(settings, recorder.engine),
            worker_expected=settings.outbox.run_in_process,
            key_needed=self._key_needed,
            has_key=settings.stripe_api_key_value() is not None,
            spool=recorder.engine.spool,
        )

        async def probe(scope: Any, receive: Any, send: Any) -> None:
            await checks(path, scope, receive, send)

        return await _asgi_exchange(probe, scope, b"")


_JSON = [("content-type", "application/json"), ("cache-control", "no-store")]


class DualWriteDjangoMiddleware:
    """The same, as a Django middleware: ``MIDDLEWARE = ["dualwrite.wsgi.DualWriteDjangoMiddleware",
    ...]``, first or early. Settings come from the file named by Django's ``DUALWRITE_CONFIG``
    setting, else from ``Settings.load()``; one ``SyncRecorder`` serves the whole process.
    The outcome is on ``request.dualwrite`` and ``request.META["dualwrite"]``.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]):
        self.get_response = get_response
        recorder = _django_recorder()
        self._gate = _UsageGate(recorder.settings, recorder, time.time)

    # Django ships no type hints: requests and responses are typed Any here.
    def __call__(self, request: Any) -> Any:
        match = self._gate.routes.match(request.method, request.path_info)
        if match is None:
            return self.get_response(request)
        meta: dict[str, Any] = request.META
        length = _content_length(meta)
        if length is None or length > match.route.max_body_bytes:
            return _django_response(_body_refusal(length, match.route.max_body_bytes))
        result = self._gate.record(
            match,
            query_string=meta.get("QUERY_STRING", "").encode("latin-1"),
            headers=_headers(meta),
            body=request.body,
        )
        if isinstance(result, JSONResponse):
            return _django_response(result)
        meta[ENVIRON_KEY] = result
        request.dualwrite = result
        return self.get_response(request)


_django_lock = threading.Lock()
_django_recorders: dict[str | None, SyncRecorder] = {}


def _django_recorder() -> SyncRecorder:
    """The process's recorder for the Django middleware (one per config file)."""
    from django.conf import settings

    path: str | None = getattr(settings, "DUALWRITE_CONFIG", None)
    with _django_lock:
        recorder = _django_recorders.get(path)
        if recorder is None:
            recorder = _django_recorders[path] = SyncRecorder(config=Settings.load(path))
        return recorder


def _django_response(response: JSONResponse) -> Any:
    from django.http import HttpResponse

    reply = HttpResponse(bytes(response.body), status=response.status_code)
    for name, value in response.headers.items():
        reply[name] = value
    return reply


def _route_path(environ: WSGIEnvironment) -> str:
    """The path as the app's router sees it (PEP 3333 carries it as Latin-1 decoded bytes)."""
    path: str = environ.get("PATH_INFO", "") or "/"
    return path if path.isascii() else path.encode("latin-1").decode("utf-8", "replace")


def _headers(environ: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The request headers, as ASGI spells them (lower-case names, Latin-1 bytes)."""
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = key
        else:
            continue
        if isinstance(value, str):
            headers.append((name.replace("_", "-").lower().encode(), value.encode("latin-1")))
    return headers


def _content_length(environ: dict[str, Any]) -> int | None:
    """The declared body size (0 when absent), or None when the header is not a number."""
    text = environ.get("CONTENT_LENGTH") or "0"
    return int(text) if text.isascii() and text.isdigit() else None


def _body_refusal(length: int | None, limit: int) -> JSONResponse:
    if length is None:
        return stripe_error(400, "The Content-Length header is invalid.")
    return stripe_error(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )


def _read_body(environ: WSGIEnvironment, limit: int) -> bytes | JSONResponse:
    """The whole request body, or the 400/413 reply when it is malformed or over ``limit``."""
    length = _content_length(environ)
    chunked = environ.get("wsgi.input_terminated", False) and not environ.get("CONTENT_LENGTH")
    if length is None or length > limit:
        return _body_refusal(length, limit)
    stream = environ["wsgi.input"]
    remaining = limit + 1 if chunked else length
    chunks: list[bytes] = []
    while remaining > 0:
        chunk = stream.read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    body = b"".join(chunks)
    if len(body) > limit:
        return _body_refusal(len(body), limit)
    if not chunked and len(body) < length:
        # The client went away mid-body: what arrived is not the request it meant to send.
        return stripe_error(
            400, f"The request body ended after {len(body)} of its {length} bytes (Content-Length)."
        )
    return body


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _respond(response: JSONResponse, start_response: StartResponse) -> list[bytes]:
    """Send one of the middleware's own (Starlette) replies through WSGI."""
    headers = [
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in response.raw_headers
    ]
    start_response(_status_line(response.status_code), headers)
    return [bytes(response.body)]


async def _asgi_exchange(
    app: ASGIApp, scope: dict[str, Any], body: bytes
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Call an ASGI app with a whole request; its whole reply (status, headers, body)."""
    sent = False
    reply: dict[str, Any] = {"status": 500, "headers": [], "body": []}

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            reply["status"] = message["status"]
            reply["headers"] = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in message.get("headers", [])
            ]
        elif message["type"] == "http.response.body":
            reply["body"].append(message.get("body", b""))

    await app({"asgi": {"version": "3.0"}, "http_version": "1.1", **scope}, receive, send)
    return reply["status"], reply["headers"], b"".join(reply["body"])
