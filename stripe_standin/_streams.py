"""API v2's high-throughput meter event path: sessions and the meter event stream.

``POST /v2/billing/meter_event_session`` (secret key) hands out a token valid for 15 minutes on the
stand-in's clock; ``POST /v2/billing/meter_event_stream`` (that token, not a key) takes 1 to 100
events and answers ``{}``. Only the request's structure is checked synchronously (the parameter
table does that); everything about the events themselves is checked afterwards, as Stripe does:
accepted events go into the same store as v1's, so totals, summaries, identifier dedupe and
cancellations apply alike; refused ones are not counted and wait in ``Store.async_errors`` for the
next error report. A duplicate identifier within 24 hours is dropped without an error.
"""

from __future__ import annotations

from typing import Any

from stripe_standin._meters import (
    IDENTIFIER_WINDOW,
    Refusal,
    event_time,
    find_meter,
    read_value,
    resolve,
    timestamp_refusal,
)
from stripe_standin._objects import render_meter_event_session
from stripe_standin._state import Call, MeterEvent, MeterSession, Store

__all__ = ["SESSION_LIFETIME", "create_meter_session", "expire_sessions", "stream_meter_events"]

SESSION_LIFETIME = 15 * 60
"""Seconds a meter event session's token is valid (Stripe's API reference: 15 minutes)."""


def create_meter_session(store: Store, call: Call) -> dict[str, Any]:
    """POST /v2/billing/meter_event_session."""
    session = MeterSession(
        id=store.new_id("mes_test", 24),
        authentication_token=store.new_id("meses", 40),
        created=call.now,
        expires_at=call.now + SESSION_LIFETIME,
    )
    store.meter_sessions[session.authentication_token] = session
    return render_meter_event_session(session)


def expire_sessions(store: Store, now: int) -> int:
    """End every session still valid at ``now``; return how many were."""
    with store.lock:
        live = [s for s in store.meter_sessions.values() if now < s.expires_at]
        for session in live:
            session.expires_at = now
    return len(live)


def stream_meter_events(store: Store, call: Call) -> dict[str, Any]:
    """POST /v2/billing/meter_event_stream: take every event, judge each one later."""
    for spec in call.params["events"]:
        _ingest(store, spec, call.now)
    return {}


def _ingest(store: Store, spec: dict[str, Any], now: int) -> None:
    """Stripe's asynchronous processing of one streamed event, done at once."""
    identifier: str = spec.get("identifier") or store.new_uuid()
    previous = store.events_by_identifier.get(identifier)
    if previous is not None and previous.created > now - IDENTIFIER_WINDOW:
        # Deduplicated: Stripe counts an identifier once per 24 hours and the stream cannot say so.
        return
    event_name: str = spec["event_name"]
    payload: dict[str, str] = spec["payload"]
    meter = find_meter(store, event_name)
    at = event_time(store, meter, payload, now)
    ts: int = spec.get("timestamp", at)
    event = MeterEvent(identifier, event_name, dict(payload), ts, now, len(store.events))
    problem = timestamp_refusal(ts, at)
    value = None
    if meter is not None and meter.formula != "count" and meter.value_key in payload:
        read = read_value(payload[meter.value_key], meter.value_key)
        if isinstance(read, Refusal):
            problem = problem or read
        else:
            value = read
    # UNVERIFIED: whether an event refused asynchronously still uses up its identifier; the
    # stand-in says yes, as it does for v1 events refused later (unknown customer and so on).
    resolve(store, event, meter, value, problem)
    store.events.append(event)
    store.events_by_identifier[identifier] = event
