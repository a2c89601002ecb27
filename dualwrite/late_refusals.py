"""Late refusals: meter events Stripe accepted, then refused when it validated them.

Stripe validates meter events asynchronously and reports refusals as
``v1.billing.meter.error_report_triggered`` thin events pushed to an Event Destination. Point one
at dualwrite (``POST /_dualwrite/stripe/events`` on the proxy or behind the middleware), set
``STRIPE_WEBHOOK_SECRET`` to its signing secret, and every sampled identifier in a report is marked:
its ledger row stops counting it as accepted on the meter leg, counts it as refused late, and the
divergence log gets an entry with Stripe's code and message.

To find the customer of a sampled identifier, each meter event dualwrite writes is remembered for
``[webhooks] track_seconds`` (only while a webhook secret is set). A sample dualwrite did not write,
or no longer remembers, is counted as unknown and logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from dualwrite import instruments
from dualwrite._http import read_body, stripe_error
from dualwrite.config import Settings
from dualwrite.exceptions import ClientDisconnectedError, StoreUnavailableError
from dualwrite.keys import KeySpace
from dualwrite.ledger import LedgerUpdate, LegView, divergence_fields, ledger_script
from dualwrite.models import Stage, UsageEvent
from dualwrite.redis_client import as_int, as_str, store_errors
from dualwrite.stripe_io import (
    EventFetchError,
    EventSignatureError,
    MeterErrorSample,
    StripeWriter,
    fetch_error_report,
)

__all__ = ["MAX_EVENT_BYTES", "LateRefusalResult", "LateRefusals", "TrackedMeterEvent"]

log = logging.getLogger("dualwrite.late")  # the name it logged under before the module was renamed

#: The largest pushed event read: Stripe's thin events are a few hundred bytes (the full event is
#: fetched from Stripe), so anything much larger is refused before it is read.
MAX_EVENT_BYTES = 64 * 1024

# KEYS and ARGV: the ledger block (``dualwrite.ledger``: the increments and the divergence entry),
# then the marker (own key) and its ttl (own argument). Counts only when the marker is new.
_MARK = ledger_script(
    """
local marker = KEYS[OWN_KEYS]
if not redis.call('SET', marker, '1', 'NX', 'EX', ARGV[OWN_ARGS]) then return 0 end
ledger_update()
return 1
"""
)


class TrackedMeterEvent(BaseModel):
    """What dualwrite remembers of a meter event it wrote, to attribute a late refusal."""

    model_config = ConfigDict(frozen=True)

    event: UsageEvent
    value: int
    stage: Stage
    period: str | None = None


class LateRefusalResult(BaseModel):
    """What one pushed event did."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    event_type: str
    marked: int = 0
    """Samples newly marked as refused late."""
    repeated: int = 0
    """Samples already marked by an earlier report."""
    unknown: int = 0
    """Samples dualwrite did not write, or no longer remembers."""


class LateRefusals:
    """Remembers meter events and marks those Stripe's error reports refuse."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        writer: StripeWriter,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self._redis = redis
        self._keys = keys
        self._client = writer.client
        self._settings = settings
        self._clock = clock
        self._mark = redis.register_script(_MARK)
        secret = settings.stripe_webhook_secret_value()
        self.enabled = secret is not None and settings.webhooks.track_seconds > 0

    async def remember(
        self, event: UsageEvent, *, value: int, stage: Stage, period: str | None
    ) -> None:
        """Keep a meter event written to Stripe findable by its identifier (best effort)."""
        if not self.enabled:
            return
        tracked = TrackedMeterEvent(event=event, value=value, stage=stage, period=period)
        key = self._keys.tracked_meter_event(event.meter_identifier)
        try:
            async with store_errors("remembering a meter event"):
                await self._redis.set(
                    key, tracked.model_dump_json(), ex=self._settings.webhooks.track_seconds
                )
        except StoreUnavailableError:
            log.warning("could not remember meter event %s for late refusals", event.identifier)

    async def handle(self, payload: bytes, signature: str | None) -> LateRefusalResult:
        """Verify a pushed event and mark its sampled identifiers.

        Raises:
            EventSignatureError: the signature does not verify.
            EventFetchError: the full event could not be fetched.
            StoreUnavailableError: Redis could not be reached.
        """
        secret, api_key = (
            self._settings.stripe_webhook_secret_value(),
            self._settings.stripe_api_key_value(),
        )
        if secret is None or api_key is None:
            msg = "set STRIPE_WEBHOOK_SECRET and STRIPE_API_KEY to receive Stripe's error reports"
            raise EventSignatureError(msg)
        report = await fetch_error_report(
            self._client, payload, signature, secret=secret, api_key=api_key
        )
        result = LateRefusalResult(event_id=report.event_id, event_type=report.event_type)
        counts = {"marked": 0, "repeated": 0, "unknown": 0}
        for sample in report.samples:
            counts[await self._mark_sample(sample)] += 1
        if counts["unknown"]:
            log.warning(
                "error report %s: %d sampled meter event(s) dualwrite cannot attribute",
                report.event_id,
                counts["unknown"],
            )
        return result.model_copy(update=counts)

    async def _mark_sample(self, sample: MeterErrorSample) -> str:
        async with store_errors("reading a tracked meter event"):
            raw = as_str(await self._redis.get(self._keys.tracked_meter_event(sample.identifier)))
        if raw is None:
            return "unknown"
        tracked = TrackedMeterEvent.model_validate_json(raw)
        shard = self._keys.for_customer(tracked.event.customer)
        update = LedgerUpdate(shard, tracked.event, tracked.period).late_refused(tracked.value)
        divergence = divergence_fields(
            tracked.event,
            kind="late_refusal",
            stage=tracked.stage,
            legacy=LegView(status="not_written"),
            meter=LegView(
                status="refused",
                stripe_id=sample.identifier,
                error=f"{sample.code}: {sample.message}",
            ),
            note="refused by Stripe after it accepted the event",
            at=self._clock(),
        )
        keys, args = update.block(
            divergence=divergence, divergence_maxlen=self._settings.ledger.divergence_maxlen
        )
        keys.append(shard.late_marker(sample.identifier))
        args.append(self._settings.webhooks.track_seconds + 86400)
        async with store_errors("marking a late refusal"):
            done = as_int(await self._mark(keys=keys, args=args))
        if done != 1:
            return "repeated"
        instruments.count_late_refusal()
        return "marked"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The receiving endpoint: ``POST`` a pushed event; 413 over ``MAX_EVENT_BYTES`` (read no
        further), 400 on a bad signature, 502 when the event cannot be fetched or recorded
        (Stripe then delivers it again)."""
        request = Request(scope, receive)
        response: Response
        if request.method != "POST":
            response = stripe_error(405, "POST Stripe events here.")
        else:
            try:
                body = await read_body(receive, MAX_EVENT_BYTES)
            except ClientDisconnectedError:
                return  # an incomplete event is no event, and nobody is left to answer
            if body is None:
                response = stripe_error(413, f"A Stripe event is at most {MAX_EVENT_BYTES} bytes.")
            else:
                response = await self._receive(body, request)
        await response(scope, receive, send)

    async def _receive(self, body: bytes, request: Request) -> Response:
        """The reply to a complete event: what was done with it, or why it was not taken."""
        try:
            result = await self.handle(body, request.headers.get("stripe-signature"))
        except EventSignatureError as exc:
            return stripe_error(400, str(exc))
        except (EventFetchError, StoreUnavailableError) as exc:
            log.warning("could not process a Stripe event: %s", type(exc).__name__)
            return stripe_error(502, "try again later", error_type="api_error")
        return JSONResponse(result.model_dump())
