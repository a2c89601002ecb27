"""``StripeWriter``: one leg of a usage event written to Stripe, within the shared rate limits."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import stripe

from dualwrite.config import MeterMapping, StripeSettings
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.models import EventPlan, Leg, StripeFailure, UsageEvent, WriteResult
from dualwrite.rate_limits import MeterTurn, RateLimitedError, WriteLimits
from dualwrite.stripe_io._clock import StripeClock
from dualwrite.stripe_io._failures import as_dict, failure_from_exception, refused
from dualwrite.stripe_io._http import PooledAIOHTTPClient
from dualwrite.stripe_io._sdk import plain, v1_services
from dualwrite.stripe_io._stream import MeterStream, iso_timestamp

__all__ = ["ItemDetails", "StripeWriter"]

log = logging.getLogger(__name__)

_NO_KEY = "sk_unset_dualwrite"
#: How soon a failed look at Stripe's clock is tried again (usage meanwhile is refused, retryable).
_PROBE_RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ItemDetails:
    """What the proxy needs to know about a subscription item to map its usage records."""

    item: str
    subscription: str
    customer: str
    price: str | None
    lookup_key: str | None
    period_start: int | None = None
    """The current billing period of the item's subscription (on the item from basil on, on the
    subscription before)."""
    period_end: int | None = None
    interval: str | None = None
    """The price's billing interval (day, week, month, year) and how many of them make a period."""
    interval_count: int = 1
    billing_cycle_anchor: int | None = None
    """The subscription's anchor: every billing period follows from it."""


class StripeWriter:
    """Writes one leg of a usage event to Stripe and reports the result, never raising for Stripe's
    refusals.

    Args:
        settings: where Stripe is and how to reach it.
        api_key: the account's secret key (``STRIPE_API_KEY``); a per-call key overrides it
            (the proxy passes its caller's own).
        meters: maps a meter event name to its payload keys.
        limits: the shared rate limits every write waits for (none: unlimited).
        clock: this process's clock, against which Stripe's is tracked (``clock``).
    """

    def __init__(
        self,
        settings: StripeSettings,
        *,
        api_key: str | None,
        meters: Callable[[str], MeterMapping],
        limits: WriteLimits | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._settings = settings
        self._api_key = api_key
        self._meters = meters
        self.limits = limits
        self.clock = StripeClock(local=clock)
        """Stripe's clock, from the ``Date`` of every reply this writer (and the proxy) reads."""
        self._probe_lock = asyncio.Lock()
        self._probed_at = -_PROBE_RETRY_SECONDS
        self._http = PooledAIOHTTPClient(
            timeout=settings.timeout,
            max_connections=settings.max_connections,
            verify_tls=settings.api_base.startswith("https://"),
            on_date=self.clock.observe,
        )
        self._client = stripe.StripeClient(
            api_key or _NO_KEY,
            base_addresses={"api": settings.api_base, "meter_events": settings.stream_base},
            http_client=self._http,
            # Retries belong to the outbox (with backoff and a ledger); the request path makes one try.
            max_network_retries=0,
        )
        self.stream = MeterStream(self._client)

    @property
    def meter_path(self) -> str:
        """``v1`` or ``v2``: how meter events are sent."""
        return self._settings.meter_path

    @property
    def client(self) -> stripe.StripeClient:
        """The underlying SDK client (for reads such as item lookups and summaries)."""
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.close_async()

    async def stripe_now(self) -> int | None:
        """Stripe's now (never later than its clock): the instant a ``timestamp`` of ``now`` is
        fixed to. Before any reply was seen, one unauthenticated request (no key is sent; Stripe
        answers 401 with its ``Date``) reads the clock, waiting at most the configured Stripe
        ``timeout``. None when Stripe's clock could not be read: this host's clock is not
        guessed from, since a few seconds off near a period's start or end puts usage in
        another billing period, or has it refused."""
        if not self.clock.known:
            await self._probe_clock()
        return self.clock.now() if self.clock.known else None

    async def _probe_clock(self) -> None:
        async with self._probe_lock:
            if self.clock.known or time.monotonic() - self._probed_at < _PROBE_RETRY_SECONDS:
                return
            try:
                async with asyncio.timeout(self._settings.timeout):
                    await self._http.request_async("get", f"{self._settings.api_base}/v1", {})
            except (stripe.StripeError, TimeoutError):
                log.warning("Stripe's clock could not be read; usage without a timestamp waits")
            finally:
                self._probed_at = time.monotonic()

    async def write(
        self,
        leg: Leg,
        event: UsageEvent,
        *,
        value: int | None = None,
        api_key: str | None = None,
        max_wait: float | None = None,
        plan: EventPlan | None = None,
        prepaid: bool = False,
    ) -> WriteResult:
        """Write ``event`` to ``leg`` within the shared rate limits.

        ``value`` overrides the meter value (a translated ``set``); ``max_wait`` bounds the wait for
        a rate-limit turn (default: the request path's), after which the write is refused with a
        retryable local 429; ``plan`` names the legacy write's key and ``expand`` when they are the
        proxy's caller's; ``prepaid``: the legacy rate's unit for this write was granted already
        (taken in the claim's round trip).
        """
        delivery = self.delivery(
            leg, event, value=value, api_key=api_key, max_wait=max_wait, plan=plan, prepaid=prepaid
        )
        async with delivery as (result, _turn):
            return result

    @asynccontextmanager
    async def delivery(
        self,
        leg: Leg,
        event: UsageEvent,
        *,
        value: int | None = None,
        api_key: str | None = None,
        max_wait: float | None = None,
        plan: EventPlan | None = None,
        prepaid: bool = False,
    ) -> AsyncIterator[tuple[WriteResult, MeterTurn | None]]:
        """``write``, still holding the v1 meter turn (if one was taken) inside the block.

        Settle inside the block and hand the turn to ``Outbox.settle``: the settle's script then
        releases it in the same round trip; whatever is left unreleased is released on leaving.
        """
        async with AsyncExitStack() as stack:
            held: WriteResult | None = None
            turn: MeterTurn | None = None
            try:
                turn = await self._take_turn(stack, leg, event, max_wait, prepaid=prepaid)
            except RateLimitedError as exc:
                await stack.aclose()  # give a turn taken before the refusal back at once
                held = _held_back(leg, exc)
            if held is not None:
                yield held, None
                return
            if leg is Leg.LEGACY:
                result = await self.write_legacy(event, api_key=api_key, plan=plan)
            else:
                result = await self.write_meter(event, value=value, api_key=api_key)
            yield result, turn

    async def _take_turn(
        self,
        stack: AsyncExitStack,
        leg: Leg,
        event: UsageEvent,
        max_wait: float | None,
        *,
        prepaid: bool = False,
    ) -> MeterTurn | None:
        """Wait for the limits ``leg`` goes through; the meter turn stays held in ``stack``."""
        limits = self.limits
        if limits is None or (prepaid and leg is Leg.LEGACY):
            return None
        wait = limits.settings.request_max_wait if max_wait is None else max_wait
        turn: MeterTurn | None = None
        try:
            if leg is Leg.LEGACY:
                await limits.take("legacy", max_wait=wait)
            elif self._settings.meter_path == "v2":
                await limits.take("stream", max_wait=wait)  # no per-customer turn on v2
            else:
                turn = await stack.enter_async_context(
                    limits.meter_turn(event.customer, event.event_name, max_wait=wait)
                )
                await limits.take("meter", max_wait=wait)
        except StoreUnavailableError:
            # Limits are a courtesy to Stripe; losing Redis must not stop the write itself.
            log.warning("rate limits unavailable (Redis); writing without them")
        return turn

    async def write_legacy(
        self, event: UsageEvent, *, api_key: str | None = None, plan: EventPlan | None = None
    ) -> WriteResult:
        """Create a usage record on the event's subscription item (under the key ``plan`` names,
        with its ``expand``: a replay of the proxy's forwarded request sends what it sent)."""
        options = self._options(event, Leg.LEGACY, api_key)
        if isinstance(options, WriteResult):
            return options
        if plan is not None:
            options["idempotency_key"] = plan.legacy_idempotency_key(event)
            if plan.legacy_expand:
                options["expand"] = list(plan.legacy_expand)
        if event.subscription_item is None:
            failure = StripeFailure(
                http_status=400,
                type="invalid_request_error",
                code="parameter_missing",
                param="subscription_item",
                message="A usage record needs the subscription item the usage belongs to.",
            )
            return WriteResult(leg=Leg.LEGACY, accepted=False, http_status=400, failure=failure)
        try:
            response = await self._client.raw_request_async(
                "post",
                f"/v1/subscription_items/{event.subscription_item}/usage_records",
                quantity=event.quantity,
                timestamp=event.timestamp,
                action=event.action,
                stripe_version=self._settings.legacy_api_version,
                **options,
            )
        except stripe.StripeError as exc:
            return refused(Leg.LEGACY, exc)
        body = as_dict(response.data)
        return WriteResult(
            leg=Leg.LEGACY,
            accepted=True,
            stripe_id=str(body.get("id", "")) or None,
            http_status=response.code,
            response=body,
            value=event.quantity,
        )

    async def write_meter(
        self, event: UsageEvent, *, value: int | None = None, api_key: str | None = None
    ) -> WriteResult:
        """Send a meter event carrying the event's (or the translated) value: a v1 meter event, or
        a one-event call of the v2 stream when ``meter_path = "v2"``."""
        amount = event.quantity if value is None else value
        if self._settings.meter_path == "v2":
            [result] = await self._stream_batch([(event, amount)], api_key=api_key)
            return result
        options = self._options(event, Leg.METER, api_key)
        if isinstance(options, WriteResult):
            return options
        try:
            # A raw request: the reply is read as a dict, not built into a StripeObject first.
            response = await self._client.raw_request_async(
                "post",
                "/v1/billing/meter_events",
                event_name=event.event_name,
                payload=self._payload(event, amount),
                identifier=event.meter_identifier,
                timestamp=event.timestamp,
                **options,
            )
        except stripe.StripeError as exc:
            return refused(Leg.METER, exc)
        body = as_dict(response.data)
        return WriteResult(
            leg=Leg.METER,
            accepted=True,
            stripe_id=str(body.get("identifier") or event.meter_identifier),
            http_status=200,
            response=body,
            value=amount,
        )

    async def write_meter_batch(
        self,
        items: Sequence[tuple[UsageEvent, int]],
        *,
        api_key: str | None = None,
        max_wait: float | None = None,
    ) -> list[WriteResult]:
        """Send up to 100 meter events in one call of the v2 stream (one result per event).

        Stripe validates stream events later: ``accepted`` means received, and a late refusal
        arrives as an error-report event (``dualwrite.webhooks``).
        """
        limits = self.limits
        if limits is not None:
            wait = limits.settings.request_max_wait if max_wait is None else max_wait
            try:
                await limits.take("stream", cost=len(items), max_wait=wait)
            except RateLimitedError as exc:
                return [_held_back(Leg.METER, exc)] * len(items)
            except StoreUnavailableError:
                log.warning("rate limits unavailable (Redis); streaming without them")
        return await self._stream_batch(items, api_key=api_key)

    async def _stream_batch(
        self, items: Sequence[tuple[UsageEvent, int]], *, api_key: str | None
    ) -> list[WriteResult]:
        key = api_key or self._api_key
        if not key:
            return [_no_key(Leg.METER)] * len(items)
        events = [
            {
                "event_name": event.event_name,
                "payload": self._payload(event, amount),
                "identifier": event.meter_identifier,
                "timestamp": iso_timestamp(event.timestamp),
            }
            for event, amount in items
        ]
        try:
            await self.stream.send(events, api_key=key)
        except stripe.StripeError as exc:
            return [refused(Leg.METER, exc)] * len(items)
        return [
            WriteResult(
                leg=Leg.METER,
                accepted=True,
                stripe_id=event.meter_identifier,
                http_status=200,
                value=amount,
            )
            for event, amount in items
        ]

    def _payload(self, event: UsageEvent, amount: int) -> dict[str, str]:
        meter = self._meters(event.event_name)
        return {meter.customer_payload_key: event.customer, meter.value_payload_key: str(amount)}

    async def retrieve_item(self, item: str, *, api_key: str) -> ItemDetails | StripeFailure:
        """Read a subscription item, and its subscription's customer, with the caller's key.

        The item is read at the pre-basil ``legacy_api_version`` so that a legacy metered price
        looks as the caller's usage records see it. Stripe's refusal comes back as a value.
        """
        options: dict[str, Any] = {
            "api_key": api_key,
            "stripe_version": self._settings.legacy_api_version,
        }
        services = v1_services(self._client)  # an app using the SDK hook may run stripe-python 11.x
        try:
            found = await services.subscription_items.retrieve_async(
                item,
                options=options,
            )
            subscription_id = str(found["subscription"])
            subscription = await services.subscriptions.retrieve_async(
                subscription_id,
                options=options,
            )
        except stripe.StripeError as exc:
            return failure_from_exception(exc)
        item_body, subscription_body = plain(found), plain(subscription)
        price = as_dict(item_body.get("price"))
        recurring = as_dict(price.get("recurring"))
        customer = subscription["customer"]
        start = item_body.get("current_period_start") or subscription_body.get(
            "current_period_start"
        )
        end = item_body.get("current_period_end") or subscription_body.get("current_period_end")
        anchor = subscription_body.get("billing_cycle_anchor")
        return ItemDetails(
            item=item,
            subscription=subscription_id,
            customer=str(customer if isinstance(customer, str) else customer["id"]),
            price=str(price["id"]) if price.get("id") else None,
            lookup_key=str(price["lookup_key"]) if price.get("lookup_key") else None,
            period_start=int(start) if start else None,
            period_end=int(end) if end else None,
            interval=str(recurring["interval"]) if recurring.get("interval") else None,
            interval_count=int(recurring.get("interval_count") or 1),
            billing_cycle_anchor=int(anchor) if isinstance(anchor, int) else None,
        )

    def _options(
        self, event: UsageEvent, leg: Leg, api_key: str | None
    ) -> dict[str, Any] | WriteResult:
        key = api_key or self._api_key
        if not key:
            return _no_key(leg)
        return {"api_key": key, "idempotency_key": event.idempotency_key(leg)}


def _no_key(leg: Leg) -> WriteResult:
    failure = StripeFailure(
        http_status=401,
        type="invalid_request_error",
        code="api_key_missing",
        message="No Stripe API key: set STRIPE_API_KEY (or send one through the proxy).",
    )
    return WriteResult(leg=leg, accepted=False, http_status=401, failure=failure)


def _held_back(leg: Leg, exc: RateLimitedError) -> WriteResult:
    failure = StripeFailure(
        http_status=429,
        type="invalid_request_error",
        code="rate_limit",
        message=f"dualwrite held this write back: {exc}",
        retryable=True,
        retry_after=exc.retry_after,
    )
    return WriteResult(leg=leg, accepted=False, http_status=429, failure=failure)
