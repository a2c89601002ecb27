"""The ASGI app: Stripe's request pipeline for ``/v1`` and ``/v2``, plus the ``/_standin`` controls.

Each API call goes: authenticate → parse the form → find the endpoint → maybe inject a fault →
idempotency (replay, or reserve the key) → latency → refusal rules and parameter validation
(failures here release the key: nothing began executing) → execute under the account lock → save
the reply under the key → reply (held back for ``timeout_seconds`` on a ``timeout`` fault).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import secrets
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dualwrite.testing._control import control_routes
from dualwrite.testing._endpoints import Endpoint, match_endpoint
from dualwrite.testing._errors import StripeApiError
from dualwrite.testing._faults import fault_error
from dualwrite.testing._params import decode_form, flatten, validate
from dualwrite.testing._state import Call, parse_version

if TYPE_CHECKING:
    from dualwrite.testing._standin import StripeStandin

__all__ = ["RequestLogEntry", "Wakeup", "build_app", "mask_key"]

NO_KEY = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/."
)
_KEY_PREFIXES = ("sk_test_", "rk_test_", "sk_live_", "rk_live_", "pk_test_", "pk_live_")
_METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH"]


@dataclass(frozen=True, slots=True)
class RequestLogEntry:
    """One call the stand-in answered (the API key itself is never recorded)."""

    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None
    status: int
    stripe_version: str
    request_id: str
    replayed: bool = False
    fault: str | None = None
    executed: bool = False
    time: int = 0
    flat_params: dict[str, str] = field(default_factory=dict)


def mask_key(key: str) -> str:
    """What Stripe shows of a refused key: its prefix and (for long keys) its last four chars."""
    prefix = next((p for p in _KEY_PREFIXES if key.startswith(p)), "")
    rest = key[len(prefix) :]
    return f"{prefix}****{rest[-4:]}" if len(rest) >= 12 else f"{prefix}****"


class Wakeup:
    """Sleeps that end early when the server shuts down (so held-back replies never block it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._events: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
            weakref.WeakKeyDictionary()
        )

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if ``close()`` is called meanwhile."""
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                return
            event = self._events.get(loop)
            if event is None:
                event = self._events[loop] = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    def close(self) -> None:
        """End every pending sleep now (callable from any thread)."""
        with self._lock:
            self._closed = True
            pending = list(self._events.items())
            self._events.clear()
        for loop, event in pending:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    def reopen(self) -> None:
        """Allow sleeping again (before the app is served anew)."""
        with self._lock:
            self._closed = False


@dataclass(slots=True)
class _Outcome:
    """The reply being built for one call, and what happened on the way."""

    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False
    executed: bool = False
    delayed: bool = False
    fault: str | None = None


@dataclass(frozen=True, slots=True)
class _Request:
    """A routed API call: its path, ids, caller, raw parameters and headers that matter."""

    path: str
    path_args: dict[str, str]
    scope: str
    raw: dict[str, Any]
    request_id: str
    version: str
    idempotency_key: str | None


class _StripeApi:
    """The ``/v1`` and ``/v2`` pipeline bound to one stand-in."""

    def __init__(self, standin: StripeStandin) -> None:
        self._s = standin

    def _authenticate(self, header: str | None) -> str:
        """The caller's key scope (a digest of the key), or Stripe's 401."""
        scheme, _, value = (header or "").strip().partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = value.strip()
        elif scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                key = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
        if not key:
            raise StripeApiError(401, NO_KEY, headers={"WWW-Authenticate": 'Basic realm="Stripe"'})
        if not self._s.accepts_key(key):
            raise StripeApiError(401, f"Invalid API Key provided: {mask_key(key)}")
        return hashlib.sha256(key.encode()).hexdigest()

    async def handle(self, request: Request) -> Response:
        """Answer one API call."""
        s = self._s
        method, path = request.method, request.url.path
        request_id = f"req_{secrets.token_urlsafe(10).replace('-', 'x').replace('_', 'y')}"
        idem_key = request.headers.get("idempotency-key")
        version = request.headers.get("stripe-version") or s.default_api_version
        out = _Outcome(headers={"Request-Id": request_id, "Stripe-Version": version})
        if idem_key is not None:
            out.headers["Idempotency-Key"] = idem_key
        raw: dict[str, Any] = {}
        try:
            scope = self._authenticate(request.headers.get("authorization"))
            parse_version(version)
            matched = match_endpoint(method, path)
            if matched is None:
                msg = (
                    f"Unrecognized request URL ({method}: {path}). Please see "
                    "https://stripe.com/docs or we can help at https://support.stripe.com/."
                )
                raise StripeApiError(404, msg)
            pairs = parse_qsl(request.url.query, keep_blank_values=True)
            body = await request.body()
            if body:
                pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
            raw = decode_form(pairs)
            endpoint, path_args = matched
            call = _Request(path, path_args, scope, raw, request_id, version, idem_key)
            await self._run(out, endpoint, call)
        except StripeApiError as exc:
            out.status, out.body = exc.status, exc.body()
            out.headers.update(exc.headers)
        s._record(
            RequestLogEntry(
                method=method,
                path=path,
                params=raw,
                idempotency_key=idem_key,
                status=out.status,
                stripe_version=version,
                request_id=request_id,
                replayed=out.replayed,
                fault=out.fault,
                executed=out.executed,
                time=s.clock.now(),
                flat_params=flatten(raw),
            )
        )
        if out.fault == "timeout":
            await s._wakeup.sleep(s.faults.timeout_seconds)
        if not out.delayed:
            await s._wakeup.sleep(s.latency_seconds)
        return JSONResponse(out.body, status_code=out.status, headers=out.headers)

    async def _run(self, out: _Outcome, endpoint: Endpoint, req: _Request) -> None:
        """Faults, idempotency, validation and execution of one routed call."""
        s = self._s
        out.fault = s.faults.draw(req.path)
        if out.fault is not None and out.fault != "timeout":
            raise fault_error(out.fault)
        key = req.idempotency_key if endpoint.method == "POST" else None
        if key is not None:
            saved = s._idempotency.begin(
                req.scope,
                key,
                method=endpoint.method,
                path=req.path,
                params=req.raw,
                now=s.clock.now(),
                request_id=req.request_id,
            )
            if saved is not None:
                out.status, out.body, out.replayed = saved.status or 200, saved.body, True
                out.headers.update(saved.headers)
                out.headers["Idempotent-Replayed"] = "true"
                out.headers["Original-Request"] = saved.request_id
                return
            out.headers["Original-Request"] = req.request_id
        finished = False
        try:
            out.delayed = True
            await s._wakeup.sleep(s.latency_seconds)
            s.faults.check_refusals(req.path, flatten(req.raw))
            params = validate(endpoint.params, req.raw)
            extra_headers: dict[str, str] = {}
            with s._store.lock:
                call = Call(s.clock.now(), req.version, req.path, req.path_args, params)
                out.executed = True
                try:
                    out.body = endpoint.handler(s._store, call)
                except StripeApiError as exc:
                    out.status, out.body, extra_headers = exc.status, exc.body(), exc.headers
                    out.headers.update(exc.headers)
            if key is not None:
                s._idempotency.finish(req.scope, key, out.status, out.body, extra_headers)
                finished = True
        finally:
            # Nothing began executing (or the handler crashed): free the key for a retry.
            if key is not None and not finished:
                s._idempotency.release(req.scope, key)


def build_app(standin: StripeStandin) -> Starlette:
    """The stand-in's Starlette app: ``/_standin/*`` controls, and Stripe's API everywhere else."""
    api = _StripeApi(standin)
    return Starlette(
        routes=[*control_routes(standin), Route("/{path:path}", api.handle, methods=_METHODS)]
    )
