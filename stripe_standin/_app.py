"""The ASGI app: Stripe's request pipeline for ``/v1`` and ``/v2``, plus the ``/_standin`` controls.

Each API call goes: find the endpoint → authenticate (an API key, or for the meter event stream a
meter event session's token) → parse the form (``/v1``) or the JSON body (``/v2``) → maybe inject
a fault → idempotency (replay, or reserve the key) → latency → refusal rules and parameter
validation (failures here release the key: nothing began executing) → execute under the account
lock → save the reply under the key → reply (held back for ``timeout_seconds`` on a ``timeout``
fault). ``/v2`` errors take API v2's shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import secrets
import threading
import weakref
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stripe_standin._control import control_routes
from stripe_standin._endpoints import Auth, Endpoint, match_endpoint
from stripe_standin._errors import StripeApiError
from stripe_standin._faults import fault_error
from stripe_standin._invoices import settle_invoices
from stripe_standin._params import decode_form, flatten, json_type, validate
from stripe_standin._schedules import apply_due_phases
from stripe_standin._state import Call, parse_version
from stripe_standin._test_clocks import settle_test_clocks
from stripe_standin.checking import Exchange, SpecChecker, active_checker

if TYPE_CHECKING:
    from stripe_standin._standin import StripeStandin

__all__ = ["RequestLogEntry", "Wakeup", "build_app", "mask_key"]

NO_KEY = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/."
)
SESSION_EXPIRED = "The temporary session token has expired."
"""Stripe's description of ``billing_meter_event_session_expired`` (its API reference)."""
_KEY_PREFIXES = ("sk_test_", "rk_test_", "sk_live_", "rk_live_", "pk_test_", "pk_live_")
_METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH"]
_STREAM = "/v2/billing/meter_event_stream"


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
    event_count: int | None = None
    """How many events a meter event stream call carried (None for other calls)."""


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
    v2: bool = False


async def _json_params(request: Request) -> dict[str, Any]:
    """An API v2 body: a JSON object (an empty body counts as ``{}``), plus any query string."""
    raw: dict[str, Any] = decode_form(parse_qsl(request.url.query, keep_blank_values=True))
    body = await request.body()
    if not body.strip():
        return raw
    try:
        data = json.loads(body)
    except ValueError as exc:
        msg = f"The request body is not valid JSON: {exc}."  # UNVERIFIED wording and code.
        raise StripeApiError(400, msg, code="invalid_fields") from exc
    if not isinstance(data, dict):
        msg = f"The request body must be a JSON object, not {json_type(data)}."
        raise StripeApiError(400, msg, code="invalid_fields")
    return {**raw, **data}


async def _params(request: Request, *, json_body: bool) -> dict[str, Any]:
    """The call's parameters: a v2 JSON body, or a v1 query string and form body."""
    if json_body:
        return await _json_params(request)
    pairs = parse_qsl(request.url.query, keep_blank_values=True)
    body = await request.body()
    if body:
        pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return decode_form(pairs)


class _StripeApi:
    """The ``/v1`` and ``/v2`` pipeline bound to one stand-in."""

    def __init__(self, standin: StripeStandin) -> None:
        self._s = standin

    def _authenticate(self, header: str | None, auth: Auth) -> str:
        """The caller's scope (a digest of the key or token), or Stripe's 401."""
        scheme, _, value = (header or "").strip().partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = value.strip()
        elif scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                key = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
        if not key:
            raise StripeApiError(401, NO_KEY, headers={"WWW-Authenticate": 'Basic realm="Stripe"'})
        if auth == "meter_session":
            return self._session_scope(key)
        if not self._s.accepts_key(key):
            raise StripeApiError(401, f"Invalid API Key provided: {mask_key(key)}")
        return hashlib.sha256(key.encode()).hexdigest()

    def _session_scope(self, token: str) -> str:
        """The meter event stream takes a live session token; an API key is refused outright."""
        if token.startswith(_KEY_PREFIXES):
            # UNVERIFIED: Stripe's reply to an API key on the stream (code and wording).
            msg = (
                "The meter event stream is authenticated with a meter event session's "
                "authentication_token, not an API key: create one with "
                "POST /v2/billing/meter_event_session."
            )
            raise StripeApiError(401, msg, code="unauthorized")
        if self._s._store.session_state(token, self._s.clock.now()) != "valid":
            raise StripeApiError(
                401,
                SESSION_EXPIRED,
                type="temporary_session_expired",
                code="billing_meter_event_session_expired",
            )
        return "session:" + hashlib.sha256(token.encode()).hexdigest()

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
        v2 = path.startswith("/v2/")
        matched = None
        parsed = False
        try:
            matched = match_endpoint(method, path)
            auth: Auth = matched[0].auth if matched is not None else "secret_key"
            scope = self._authenticate(request.headers.get("authorization"), auth)
            parse_version(version)
            if matched is None:
                msg = (
                    f"Unrecognized request URL ({method}: {path}). Please see "
                    "https://stripe.com/docs or we can help at https://support.stripe.com/."
                )
                raise StripeApiError(404, msg)
            endpoint, path_args = matched
            raw = await _params(request, json_body=endpoint.json)
            parsed = True
            call = _Request(path, path_args, scope, raw, request_id, version, idem_key, v2)
            await self._run(out, endpoint, call)
        except StripeApiError as exc:
            out.status, out.body = exc.status, exc.body(v2=v2)
            out.headers.update(exc.headers)
        checker = s.spec_checker or active_checker()
        if checker is not None:
            await self._check(checker, request, raw if parsed else None, version, matched, out)
        events = raw.get("events") if path == _STREAM else None
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
                event_count=len(events) if isinstance(events, list) else None,
            )
        )
        if out.fault == "timeout":
            await s._wakeup.sleep(s.faults.timeout_seconds)
        if not out.delayed:
            await s._wakeup.sleep(s.latency_seconds)
        out.headers["Date"] = formatdate(s.clock.now(), usegmt=True)  # Stripe's clock: ours
        return JSONResponse(out.body, status_code=out.status, headers=out.headers)

    async def _check(
        self,
        checker: SpecChecker,
        request: Request,
        raw: dict[str, Any] | None,
        version: str,
        matched: tuple[Endpoint, dict[str, str]] | None,
        out: _Outcome,
    ) -> None:
        """Show the answered call to the spec checker; a call refused before its parameters were
        read (a bad key, say) has them read here, for the checker only."""
        path = request.url.path
        v2 = path.startswith("/v2/")
        if raw is None:
            with contextlib.suppress(StripeApiError, UnicodeDecodeError):
                raw = await _params(request, json_body=v2)
        template = matched[0].path if matched is not None else None
        exchange = Exchange(request.method, path, version, raw, out.status, out.body, template, v2)
        checker.observe(exchange)

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
            params = _validate(endpoint, req.raw)
            extra_headers: dict[str, str] = {}
            with s._store.lock:
                call = Call(s.clock.now(), req.version, req.path, req.path_args, params)
                settle_test_clocks(s._store)  # advances that are done
                apply_due_phases(s._store, call.now)  # subscription schedules follow the clocks
                settle_invoices(s._store, call.now)  # and periods that ended are invoiced
                out.executed = True
                try:
                    out.body = endpoint.handler(s._store, call)
                except StripeApiError as exc:
                    out.status, out.body = exc.status, exc.body(v2=req.v2)
                    extra_headers = exc.headers
                    out.headers.update(exc.headers)
            if key is not None:
                s._idempotency.finish(req.scope, key, out.status, out.body, extra_headers)
                finished = True
        finally:
            # Nothing began executing (or the handler crashed): free the key for a retry.
            if key is not None and not finished:
                s._idempotency.release(req.scope, key)


def _validate(endpoint: Endpoint, raw: dict[str, Any]) -> dict[str, Any]:
    """The parameter table's checks; API v2 reports every refusal as ``invalid_fields``."""
    try:
        return validate(endpoint.params, raw)
    except StripeApiError as exc:
        if not endpoint.json:
            raise
        # stripe-node's generateV2Error: v2 flags bad or missing fields with code invalid_fields.
        raise StripeApiError(exc.status, exc.message, code="invalid_fields") from exc


def build_app(standin: StripeStandin) -> Starlette:
    """The stand-in's Starlette app: ``/_standin/*`` controls, and Stripe's API everywhere else."""
    api = _StripeApi(standin)

    async def unrouted(request: Request, exc: Exception) -> Response:
        # A path the catch-all cannot match (a decoded newline): Stripe's JSON 404 all the same.
        return await api.handle(request)

    return Starlette(
        routes=[*control_routes(standin), Route("/{path:path}", api.handle, methods=_METHODS)],
        exception_handlers={404: unrouted},
    )
