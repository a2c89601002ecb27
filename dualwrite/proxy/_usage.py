"""Intercepting ``POST /v1/subscription_items/{si}/usage_records``: one usage record, dual-written.

The form (``quantity``, ``timestamp`` as an integer or ``now``, ``action``, ``expand[]``) becomes a
``UsageEvent`` whose identifier is the caller's ``Idempotency-Key`` (minted when absent) and whose
``now`` is fixed, once, to Stripe's clock. The engine then writes it at the customer's stage
(or, for a retry, with the plan of its first intercept), with the caller's own key:

* legacy authoritative (``legacy``, ``shadow``): the caller's request goes to Stripe with the
  instant fixed here in place of ``now`` (so that both legs land in one billing period) and under
  the caller's Idempotency-Key (the event's derived key when it sent none, so that a recovery can
  replay it), and the caller gets Stripe's own reply, status, body and headers, byte for byte;
* meter authoritative (``primary``, ``meter``): the caller gets a ``usage_record``-shaped reply with
  Stripe's field names and types and an id of our own (``mbur_dw_…``, stable across retries).

A retry with the same Idempotency-Key gets the first reply again (rebuilt from the stored outcome)
and writes nothing twice. Usage the proxy cannot attribute (an unmapped item, a Connect request, a
key Stripe would not let us read the item with) is forwarded untouched and counted, never dropped.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import secrets
from typing import Any
from urllib.parse import unquote_plus, urlencode

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from dualwrite._http import failure_reply, read_body, usage_error
from dualwrite.config import ItemMapping, UsageRoute
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import ClientDisconnectedError, ConflictError, UsageInputError
from dualwrite.models import Leg, RecordOutcome, StripeFailure, UsageEvent, WriteResult
from dualwrite.proxy._items import ItemResolver, LookupFailed, Unmapped
from dualwrite.proxy._upstream import Upstream, UpstreamReply, send_reply, too_large
from dualwrite.routes import RouteMatch, build_event
from dualwrite.stripe_io import failure_from_reply

__all__ = ["USAGE_PATH_RE", "UsageInterceptor", "caller_key", "record_id"]

log = logging.getLogger("dualwrite.proxy")

#: The one request the proxy intercepts (``POST``); everything else is forwarded.
USAGE_PATH_RE = re.compile(r"/v1/subscription_items/(?P<item>[^/]+)/usage_records")
_PARAMS = frozenset({"quantity", "timestamp", "action", "expand"})
_FORM_TYPE = "application/x-www-form-urlencoded"
_CONNECT_HEADERS = (b"stripe-account", b"stripe-context")
_ROUTE = UsageRoute.model_validate(
    {
        "method": "POST",
        "path": "/v1/subscription_items/{subscription_item}/usage_records",
        "subscription_item": "path:subscription_item",
        "quantity": "form:quantity",
        "timestamp": "form:timestamp",
        "action": "form:action",
    }
)


def caller_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The Stripe key in the caller's ``Authorization`` header (Bearer, or Basic as ``key:``)."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, rest = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer":
            return rest.strip() or None
        if scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                decoded = base64.b64decode(rest.strip(), validate=True).decode()
                return decoded.partition(":")[0] or None
        return None
    return None


def record_id(identifier: str) -> str:
    """Our usage record id: ``mbur_dw_`` and a digest of the identifier, so a retry gets the same
    id, and the ``_dw_`` (Stripe ids have no second underscore) tells it from Stripe's."""
    return "mbur_dw_" + hashlib.sha256(identifier.encode()).hexdigest()[:24]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _failure(reply: UpstreamReply) -> StripeFailure:
    """Stripe's error reply (or the network's failure), classified as ``stripe_io`` classifies
    the SDK's exceptions."""
    if reply.failure is not None:
        return reply.failure
    headers: dict[str, str] = {}
    for name, value in reply.headers:  # the first value of each, as ``reply.header`` reads it
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return failure_from_reply(reply.status, headers, _json_object(reply.body))


def legacy_result(reply: UpstreamReply, event: UsageEvent) -> WriteResult:
    """Stripe's reply to the forwarded usage-record request, as the engine's ``WriteResult``."""
    if reply.failure is None and 200 <= reply.status < 300:
        body = _json_object(reply.body)
        return WriteResult(
            leg=Leg.LEGACY,
            accepted=True,
            stripe_id=str(body.get("id") or "") or None,
            http_status=reply.status,
            response=body,
            value=event.quantity,
        )
    failure = _failure(reply)
    return WriteResult(
        leg=Leg.LEGACY, accepted=False, http_status=failure.http_status, failure=failure
    )


class UsageInterceptor:
    """Handles the usage-record requests of one proxy app.

    Args:
        engine: records the usage at the customer's stage.
        upstream: where the caller's request goes when legacy is authoritative.
        items: maps the subscription item to a customer and meter event name.
        max_body: the largest usage-record body read (they are a few dozen bytes).
        legacy_api_version: the ``Stripe-Version`` our own replies carry when the caller sent none.
    """

    def __init__(
        self,
        engine: DualWriteEngine,
        upstream: Upstream,
        items: ItemResolver,
        *,
        max_body: int,
        legacy_api_version: str,
    ):
        self._engine = engine
        self._upstream = upstream
        self._items = items
        self._max_body = max_body
        self._version = legacy_api_version
        self._route = _ROUTE.model_copy(update={"max_body_bytes": max_body})

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, *, item: str, raw_target: bytes
    ) -> None:
        try:
            body = await read_body(receive, self._max_body)
        except ClientDisconnectedError:
            return  # an incomplete body records nothing, and nobody is left to answer
        if body is None:
            await too_large(self._max_body)(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        api_key = caller_key(headers)
        if api_key is None:
            # No key: Stripe answers (401), and the proxy's own key is never used in its place.
            await self._forward(scope, send, raw_target, body)
            return
        if any(name.lower() in _CONNECT_HEADERS for name, _ in headers):
            reason = "Connect requests (Stripe-Account, Stripe-Context) are not dual-written"
            await self._forward(scope, send, raw_target, body, unmapped=(item, reason))
            return
        resolution = await self._items.resolve(item, api_key=api_key)
        if isinstance(resolution, LookupFailed):
            failure = resolution.failure
            if failure.retryable:
                await failure_reply(failure)(scope, receive, send)
                return
            # Stripe may accept the usage record with this key: it reaches legacy only.
            reason = f"the item could not be read ({failure.type}: {failure.message})"
            await self._forward(scope, send, raw_target, body, unmapped=(item, reason))
            return
        if isinstance(resolution, Unmapped):
            await self._forward(scope, send, raw_target, body, unmapped=(item, resolution.reason))
            return
        mapping = ItemMapping.model_construct(
            customer=resolution.customer, event_name=resolution.event_name
        )
        try:
            _check_params(headers, body)
            event = await self._engine.event_at_now(
                lambda now: build_event(
                    RouteMatch(self._route, {"subscription_item": item}),
                    query_string=b"",
                    headers=headers,
                    body=body,
                    now=now,
                    items={item: mapping},
                )
            )
        except UsageInputError as exc:
            await usage_error(exc)(scope, receive, send)
            return
        await self._record(scope, receive, send, event, api_key, raw_target, body)

    async def _record(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        event: UsageEvent,
        api_key: str,
        raw_target: bytes,
        body: bytes,
    ) -> None:
        stripe_replies: list[UpstreamReply] = []
        expand = _expand(body)

        async def legacy_write(event: UsageEvent) -> WriteResult:
            # The instant fixed at intercept (never "now": both legs carry one instant), under a
            # key Stripe keeps (the caller's, else the event's derived one): a retry or a recovery
            # replays exactly these parameters, and Stripe answers with the first result.
            forwarded = {**scope, "headers": _forwarded_headers(scope["headers"], event)}
            reply = await self._upstream.exchange(
                forwarded, raw_target=raw_target, body=_legacy_form(event, expand)
            )
            stripe_replies.append(reply)
            return legacy_result(reply, event)

        try:
            outcome = await self._engine.record(
                event, api_key=api_key, legacy_write=legacy_write, legacy_expand=expand
            )
        except (UsageInputError, ConflictError) as exc:
            response = usage_error(exc)
        else:
            if stripe_replies:
                await send_reply(stripe_replies[-1], send)  # Stripe's own reply, as it came
                return
            response = self._own_reply(outcome, scope["headers"])
        await response(scope, receive, send)

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        raw_target: bytes,
        body: bytes,
        *,
        unmapped: tuple[str, str] | None = None,
    ) -> None:
        """Forward the caller's request as it is; ``unmapped`` (item, why) is counted only once
        Stripe accepted the usage (a refused or anonymous request counts nothing)."""
        reply = await self._upstream.exchange(scope, raw_target=raw_target, body=body)
        if unmapped is not None and reply.failure is None and 200 <= reply.status < 300:
            await self._items.count_unmapped(*unmapped)
        await send_reply(reply, send)

    def _own_reply(
        self, outcome: RecordOutcome, request_headers: list[tuple[bytes, bytes]]
    ) -> JSONResponse:
        """The reply when Stripe's own is not at hand: a meter-authoritative write, or a replay."""
        result = outcome.authoritative
        if not result.accepted and result.failure is not None:
            return failure_reply(result.failure)
        headers = {
            "Request-Id": f"req_dw_{secrets.token_hex(7)}",
            "Stripe-Version": _header(request_headers, b"stripe-version") or self._version,
            "Cache-Control": "no-cache, no-store",
        }
        key = _header(request_headers, b"idempotency-key")
        if key is not None:
            headers["Idempotency-Key"] = key
        if outcome.replayed:
            headers["Idempotent-Replayed"] = "true"
        if result.leg is Leg.LEGACY:
            # A replay of Stripe's usage record, as Stripe first returned it.
            return JSONResponse(
                result.response or {}, status_code=result.http_status or 200, headers=headers
            )
        event = outcome.event
        record = {
            "id": record_id(event.identifier),
            "object": "usage_record",
            "livemode": bool((result.response or {}).get("livemode", False)),
            "quantity": event.quantity,
            "subscription_item": event.subscription_item,
            "timestamp": event.timestamp,
        }
        return JSONResponse(record, headers=headers)


def _expand(body: bytes) -> tuple[str, ...]:
    """The ``expand[]`` values of a form body, in order."""
    values = []
    for chunk in body.split(b"&"):
        name, _, value = chunk.partition(b"=")
        if unquote_plus(name.decode("latin-1")).startswith("expand["):
            values.append(unquote_plus(value.decode("latin-1")))
    return tuple(values)


def _legacy_form(event: UsageEvent, expand: tuple[str, ...]) -> bytes:
    """The usage record's parameters as forwarded: the concrete instant, the action spelled out,
    as the engine's own legacy writer sends them (a recovery's replay matches it)."""
    pairs = [
        ("quantity", str(event.quantity)),
        ("timestamp", str(event.timestamp)),
        ("action", event.action),
        # Indexed, as the Stripe SDK (the engine's legacy writer) encodes a list.
        *((f"expand[{index}]", value) for index, value in enumerate(expand)),
    ]
    return urlencode(pairs).encode()


def _forwarded_headers(
    headers: list[tuple[bytes, bytes]], event: UsageEvent
) -> list[tuple[bytes, bytes]]:
    """The caller's headers for the forwarded usage record: a form body, and an Idempotency-Key
    (the event's derived legacy key when the caller sent none)."""
    kept = [(name, value) for name, value in headers if name.lower() != b"content-type"]
    kept.append((b"content-type", _FORM_TYPE.encode()))
    if not any(name.lower() == b"idempotency-key" for name, _ in kept):
        kept.append((b"idempotency-key", event.idempotency_key(Leg.LEGACY).encode()))
    return kept


def _check_params(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Refuse a parameter Stripe's usage-record endpoint does not take, as Stripe does."""
    content_type = _header(headers, b"content-type")
    if content_type and content_type.split(";")[0].strip().lower() != _FORM_TYPE:
        return  # build_event refuses the body with the field it needed
    for chunk in body.split(b"&"):
        if not chunk:
            continue
        name = unquote_plus(chunk.partition(b"=")[0].decode("latin-1"))
        if name.partition("[")[0] not in _PARAMS or (
            "[" in name and not name.startswith("expand[")
        ):
            raise UsageInputError(
                f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
            )
