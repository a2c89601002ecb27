"""Late refusals as Stripe reports them: thin v2 events pushed to event destinations.

Stripe validates meter events after accepting them and reports the failures as thin events (their
payload names the event and its related object; the receiver fetches the rest with
``GET /v2/core/events/{id}``). For the async errors collected since the last report, the stand-in
makes one ``v1.billing.meter.error_report_triggered`` per meter and one
``v1.billing.meter.no_meter_found`` for events whose name has no meter, keeps them for retrieval,
and POSTs each thin payload to every destination, signed as Stripe signs webhooks:
``Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<payload>" keyed by the secret>``.

Shapes: docs.stripe.com/api/v2/core/events/object (its example is an error report) and
stripe-python 16.1 ``stripe/events/_v1_billing_meter_*_event.py``, ``stripe/_webhook.py``.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx

from stripe_standin._clock import format_iso
from stripe_standin._errors import StandinError, no_such
from stripe_standin._meters import ASYNC_ERROR_CODES, Refusal, record_async_error
from stripe_standin._objects import render_thin_event, render_v2_event
from stripe_standin._state import Call, EventDestination, Store

__all__ = [
    "DELIVERY_TIMEOUT",
    "ERROR_REPORT_TRIGGERED",
    "NO_METER_FOUND",
    "add_destination",
    "build_reports",
    "deliver",
    "refuse_accepted",
    "retrieve_event",
    "signature_header",
]

ERROR_REPORT_TRIGGERED = "v1.billing.meter.error_report_triggered"
"""The thin event type for invalid async usage events of a meter."""
NO_METER_FOUND = "v1.billing.meter.no_meter_found"
"""The thin event type for async usage events whose event name has no meter."""
DELIVERY_TIMEOUT = 10.0
"""Seconds the stand-in waits for a destination to answer one delivery."""
_USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"


def add_destination(store: Store, url: str, secret: str) -> EventDestination:
    """Register a webhook destination; refuse a URL that is not http(s) or an empty secret."""
    if not url.startswith(("http://", "https://")):
        msg = f"an event destination needs an http:// or https:// URL, got {url!r}"
        raise StandinError(msg)
    if not secret.strip():
        msg = "an event destination needs a signing secret (Stripe's start with whsec_)"
        raise StandinError(msg)
    with store.lock:
        destination = EventDestination(store.new_id("ed_test", 24), url, secret)
        store.destinations.append(destination)
    return destination


def _summary(count: int) -> str:
    # Stripe's wording for one event (the docs example); the plural form is UNVERIFIED.
    return "There is 1 invalid event" if count == 1 else f"There are {count} invalid events"


def _report_data(errors: Sequence[dict[str, Any]], now: int) -> dict[str, Any]:
    """An error report's ``data``: counts and sample errors per code, and the window covered."""
    by_code: dict[str, list[dict[str, Any]]] = {}
    for error in errors:
        by_code.setdefault(error["code"], []).append(error)
    error_types = [
        {
            "code": code,
            "error_count": len(found),
            "sample_errors": [
                {"error_message": e["message"], "request": {"identifier": e["identifier"]}}
                for e in found
            ],
        }
        for code, found in by_code.items()
    ]
    return {
        "developer_message_summary": _summary(len(errors)),
        "reason": {"error_count": len(errors), "error_types": error_types},
        "validation_end": format_iso(now),
        "validation_start": format_iso(min(e["created"] for e in errors)),
    }


def build_reports(store: Store, now: int) -> list[dict[str, Any]]:
    """Turn the async errors not reported yet into v2 events (kept for retrieval), oldest first.

    Every error is sampled (Stripe samples some; how many is UNVERIFIED), so a receiver can tell
    exactly which identifiers were refused.
    """
    with store.lock:
        errors = store.async_errors[store.reported_errors :]
        store.reported_errors = len(store.async_errors)
        by_meter: dict[str | None, list[dict[str, Any]]] = {}
        for error in errors:
            meter = None if error["code"] == "no_meter" else error["meter"]
            by_meter.setdefault(meter, []).append(error)
        events = []
        for meter, found in by_meter.items():
            kind = NO_METER_FOUND if meter is None else ERROR_REPORT_TRIGGERED
            event_id = store.new_id("evt_test", 46)
            event = render_v2_event(event_id, kind, now, _report_data(found, now), meter)
            store.v2_events[event_id] = event
            events.append(copy.deepcopy(event))
    return events


def signature_header(payload: str, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header for ``payload`` (stripe-python's ``WebhookSignature``)."""
    signed = f"{timestamp}.{payload}".encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def deliver(
    store: Store, events: Sequence[dict[str, Any]], *, timeout: float = DELIVERY_TIMEOUT
) -> None:
    """POST each event's thin payload to every destination and log the outcome in
    ``Store.deliveries``; call it without holding the store's lock (receivers call back)."""
    with store.lock:
        destinations = list(store.destinations)
    if not destinations or not events:
        return
    with httpx.Client(timeout=timeout) as client:
        for event in events:
            payload = json.dumps(render_thin_event(event))
            for destination in destinations:
                # Real time, not the stand-in's clock: receivers check it against their own clock.
                header = signature_header(payload, destination.secret, int(time.time()))
                headers = {
                    "Content-Type": "application/json; charset=utf-8",
                    "Stripe-Signature": header,
                    "User-Agent": _USER_AGENT,
                }
                status: int | None = None
                error: str | None = None
                try:
                    status = client.post(
                        destination.url, content=payload, headers=headers
                    ).status_code
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with store.lock:
                    store.deliveries.append(
                        {
                            "event": event["id"],
                            "type": event["type"],
                            "destination": destination.id,
                            "url": destination.url,
                            "status": status,
                            "error": error,
                        }
                    )


def retrieve_event(store: Store, call: Call) -> dict[str, Any]:
    """GET /v2/core/events/{id}: an event the stand-in sent (UNVERIFIED: v2's 404 shape)."""
    event = store.v2_events.get(call.path_args["id"])
    if event is None:
        raise no_such("event", call.path_args["id"])
    return copy.deepcopy(event)


_LATE_MESSAGES = {
    "meter_event_customer_not_found": "No customer found with id `{customer}`.",
    "meter_event_no_customer_defined": "Customer mapping key {key} not found in payload.",
    "meter_event_invalid_value": "The value in the event payload is not valid.",
}


def refuse_accepted(
    store: Store, identifier: str, code: str, message: str | None, now: int
) -> dict[str, Any]:
    """Make an event that was accepted and counted stop counting, and queue the refusal for the
    next report (Stripe can refuse an event after a first look let it through)."""
    if code not in ASYNC_ERROR_CODES:
        msg = f"refuse_later() takes one of {ASYNC_ERROR_CODES}, got {code!r}"
        raise StandinError(msg)
    with store.lock:
        event = store.events_by_identifier.get(identifier)
        if event is None or not event.counted:
            state = "no meter event" if event is None else "no counted meter event"
            msg = f"the stand-in has {state} with identifier {identifier!r}"
            raise StandinError(msg)
        meter = store.meters.get(event.meter or "")
        key = meter.customer_key if meter is not None else "stripe_customer_id"
        if message is None:
            template = _LATE_MESSAGES.get(code, "The meter event was refused ({code}).")
            message = template.format(customer=event.customer, key=key, code=code)
        event.counted = False
        record_async_error(store, event, Refusal(code, message), at=now)
        return dict(store.async_errors[-1])
