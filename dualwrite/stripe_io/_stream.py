"""Stripe's v2 meter event stream: up to 100 events per call, authenticated by a session token.

A session (``POST /v2/billing/meter_event_session``) lasts 15 minutes. ``MeterStream`` keeps one
per API key, renews it a minute before it expires, and renews it at once (then retries the call
once) when Stripe answers ``billing_meter_event_session_expired``. The stream validates events
asynchronously: a 200 means "received", and refusals come later as error-report events.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import stripe

__all__ = ["MAX_STREAM_BATCH", "MeterStream", "iso_timestamp"]

#: Stripe's limit of events per stream call.
MAX_STREAM_BATCH = 100
#: Sends of one batch when its session keeps expiring, before the failure goes to the outbox.
SESSION_ATTEMPTS = 3
#: Renew a session this many seconds before it expires.
RENEW_BEFORE_SECONDS = 60.0


def iso_timestamp(unix: int) -> str:
    """A Unix time as the v2 API writes it (``2026-11-25T20:00:00.000Z``)."""
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class MeterStream:
    """Sends batches of meter events through the v2 stream, managing the session tokens."""

    def __init__(self, client: stripe.StripeClient, *, clock: Callable[[], float] = time.time):
        self._client = client
        self._clock = clock
        self._sessions: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.renewals = 0

    async def send(self, events: Sequence[dict[str, Any]], *, api_key: str) -> None:
        """Send up to ``MAX_STREAM_BATCH`` events.

        Raises:
            stripe.StripeError: Stripe refused the call (or the network failed); an expired session
                is renewed and the call retried once before anything is raised.
        """
        if not 0 < len(events) <= MAX_STREAM_BATCH:
            msg = f"a stream call carries 1 to {MAX_STREAM_BATCH} events, not {len(events)}"
            raise ValueError(msg)
        body = {"events": list(events)}
        token = await self._token(api_key)
        for attempt in range(SESSION_ATTEMPTS):
            try:
                await self._client.v2.billing.meter_event_stream.create_async(
                    body,  # type: ignore[arg-type]
                    {"api_key": token},
                )
                return
            except stripe.TemporarySessionExpiredError:
                # The session ended under this call (or the renewed one did too): renew and
                # resend; after a few tries the error goes back to the outbox, which retries it.
                if attempt == SESSION_ATTEMPTS - 1:
                    raise
                token = await self._token(api_key, expired=token)

    async def _token(self, api_key: str, *, expired: str | None = None) -> str:
        slot = hashlib.sha256(api_key.encode()).hexdigest()  # never keep the key itself as a key
        lock = self._locks.setdefault(slot, asyncio.Lock())
        async with lock:
            current = self._sessions.get(slot)
            fresh = current is not None and current[1] - RENEW_BEFORE_SECONDS > self._clock()
            if current is not None and fresh and current[0] != expired:
                return current[0]
            session = await self._client.v2.billing.meter_event_session.create_async(
                options={"api_key": api_key}
            )
            expires_at = _unix(session.expires_at)
            self._sessions[slot] = (session.authentication_token, expires_at)
            self.renewals += 1
            return session.authentication_token


def _unix(value: object) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
