"""The two writers, on the official ``stripe`` SDK: legacy usage records and meter events.

This is the only module that imports ``stripe``. Stripe's exceptions are turned into
``StripeFailure`` values here, once, classified as retryable or permanent:

* retryable: network errors and timeouts, 409 (lock or idempotency conflicts), 429, 5xx, and anything
  carrying ``Stripe-Should-Retry: true``;
* permanent: everything else, and anything carrying ``Stripe-Should-Retry: false``.

stripe-python 12+ has no usage-record methods, so the legacy writer calls the endpoint through
``raw_request_async`` with a pinned pre-basil ``Stripe-Version``.

``StripeWriter.retrieve_item`` is the one read: the proxy's look-up of a subscription item (its
price and lookup key, and its subscription's customer), made with the proxy's caller's key.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import stripe

from dualwrite.config import MeterMapping, StripeSettings
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.limits import RateLimitedError, WriteLimits
from dualwrite.models import Leg, StripeFailure, UsageEvent, WriteResult
from dualwrite.redaction import redact

__all__ = ["RETIRED_LEGACY_MARKER", "ItemDetails", "StripeWriter", "failure_from_exception"]

log = logging.getLogger(__name__)

#: Stripe's wording when a usage record is sent for an item already moved to a meter-backed price.
RETIRED_LEGACY_MARKER = "not on the legacy metered billing system"
_NO_KEY = "sk_unset_dualwrite"


@dataclass(frozen=True, slots=True)
class ItemDetails:
    """What the proxy needs to know about a subscription item to map its usage records."""

    item: str
    subscription: str
    customer: str
    price: str | None
    lookup_key: str | None


class _PooledAIOHTTPClient(stripe.AIOHTTPClient):
    """The SDK's aiohttp client, with its connection pool sized for the load.

    aiohttp rather than the SDK's default httpx client: measured here, one Stripe call costs 0.59 ms
    of CPU through aiohttp against 2.56 ms through httpx (``bench/stripe_client.py``), and a worker
    must sustain Stripe's 1,000 meter events/s on one core.
    """

    def __init__(self, *, timeout: float, max_connections: int, verify_tls: bool):
        super().__init__(timeout=aiohttp.ClientTimeout(total=timeout))
        self._max_connections = max_connections
        self._verify_tls = verify_tls
        self._own_session: aiohttp.ClientSession | None = None

    @property
    def _session(self) -> aiohttp.ClientSession:
        # Built on first use, inside the running event loop, as aiohttp requires.
        if self._own_session is None or self._own_session.closed:
            ssl_context: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=stripe.ca_bundle_path)
                if self._verify_tls
                else False
            )
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=self._max_connections, ssl=ssl_context
            )
            self._own_session = aiohttp.ClientSession(connector=connector)
        return self._own_session

    async def close_async(self) -> None:
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None


class StripeWriter:
    """Writes one leg of a usage event to Stripe and reports the result, never raising for Stripe's
    refusals.

    Args:
        settings: where Stripe is and how to reach it.
        api_key: the account's secret key (``STRIPE_API_KEY``); a per-call key overrides it
            (the proxy passes its caller's own).
        meters: maps a meter event name to its payload keys.
        limits: the shared rate limits every write waits for (none: unlimited).
    """

    def __init__(
        self,
        settings: StripeSettings,
        *,
        api_key: str | None,
        meters: Callable[[str], MeterMapping],
        limits: WriteLimits | None = None,
    ):
        self._settings = settings
        self._api_key = api_key
        self._meters = meters
        self.limits = limits
        self._http = _PooledAIOHTTPClient(
            timeout=settings.timeout,
            max_connections=settings.max_connections,
            verify_tls=settings.api_base.startswith("https://"),
        )
        self._client = stripe.StripeClient(
            api_key or _NO_KEY,
            base_addresses={"api": settings.api_base, "meter_events": settings.stream_base},
            http_client=self._http,
            # Retries belong to the outbox (with backoff and a ledger); the request path makes one try.
            max_network_retries=0,
        )

    @property
    def client(self) -> stripe.StripeClient:
        """The underlying SDK client (for reads such as item lookups and summaries)."""
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.close_async()

    async def write(
        self,
        leg: Leg,
        event: UsageEvent,
        *,
        value: int | None = None,
        api_key: str | None = None,
        max_wait: float | None = None,
    ) -> WriteResult:
        """Write ``event`` to ``leg`` within the shared rate limits.

        ``value`` overrides the meter value (a translated ``set``); ``max_wait`` bounds the wait for
        a rate-limit turn (default: the request path's), after which the write is refused with a
        retryable local 429.
        """
        try:
            async with self._turn(leg, event, max_wait):
                if leg is Leg.LEGACY:
                    return await self.write_legacy(event, api_key=api_key)
                return await self.write_meter(event, value=value, api_key=api_key)
        except RateLimitedError as exc:
            failure = StripeFailure(
                http_status=429,
                type="invalid_request_error",
                code="rate_limit",
                message=f"dualwrite held this write back: {exc}",
                retryable=True,
                retry_after=exc.retry_after,
            )
            return WriteResult(leg=leg, accepted=False, http_status=429, failure=failure)

    @asynccontextmanager
    async def _turn(
        self, leg: Leg, event: UsageEvent, max_wait: float | None
    ) -> AsyncIterator[None]:
        limits = self.limits
        if limits is None:
            yield
            return
        wait = limits.settings.request_max_wait if max_wait is None else max_wait
        async with AsyncExitStack() as stack:
            try:
                if leg is Leg.LEGACY:
                    await limits.take("legacy", max_wait=wait)
                else:
                    await stack.enter_async_context(
                        limits.meter_turn(event.customer, event.event_name, max_wait=wait)
                    )
                    await limits.take("meter", max_wait=wait)
            except StoreUnavailableError:
                # Limits are a courtesy to Stripe; losing Redis must not stop the write itself.
                log.warning("rate limits unavailable (Redis); writing without them")
            yield

    async def write_legacy(self, event: UsageEvent, *, api_key: str | None = None) -> WriteResult:
        """Create a usage record on the event's subscription item."""
        options = self._options(event, Leg.LEGACY, api_key)
        if isinstance(options, WriteResult):
            return options
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
            return _refused(Leg.LEGACY, exc)
        body = _as_dict(response.data)
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
        """Send a v1 meter event carrying the event's (or the translated) value."""
        options = self._options(event, Leg.METER, api_key)
        if isinstance(options, WriteResult):
            return options
        meter = self._meters(event.event_name)
        amount = event.quantity if value is None else value
        params: dict[str, Any] = {
            "event_name": event.event_name,
            "payload": {
                meter.customer_payload_key: event.customer,
                meter.value_payload_key: str(amount),
            },
            "identifier": event.meter_identifier,
            "timestamp": event.timestamp,
        }
        try:
            created = await self._client.v1.billing.meter_events.create_async(
                params,  # type: ignore[arg-type]
                options,  # type: ignore[arg-type]
            )
        except stripe.StripeError as exc:
            return _refused(Leg.METER, exc)
        body = created.to_dict()
        return WriteResult(
            leg=Leg.METER,
            accepted=True,
            stripe_id=str(body.get("identifier") or event.meter_identifier),
            http_status=200,
            response=body,
            value=amount,
        )

    async def retrieve_item(self, item: str, *, api_key: str) -> ItemDetails | StripeFailure:
        """Read a subscription item, and its subscription's customer, with the caller's key.

        The item is read at the pre-basil ``legacy_api_version`` so that a legacy metered price
        looks as the caller's usage records see it. Stripe's refusal comes back as a value.
        """
        options: dict[str, Any] = {
            "api_key": api_key,
            "stripe_version": self._settings.legacy_api_version,
        }
        try:
            found = await self._client.v1.subscription_items.retrieve_async(
                item,
                options=options,  # type: ignore[arg-type]
            )
            subscription_id = str(found["subscription"])
            subscription = await self._client.v1.subscriptions.retrieve_async(
                subscription_id,
                options=options,  # type: ignore[arg-type]
            )
        except stripe.StripeError as exc:
            return failure_from_exception(exc)
        price = _as_dict(found.to_dict().get("price"))
        customer = subscription["customer"]
        return ItemDetails(
            item=item,
            subscription=subscription_id,
            customer=str(customer if isinstance(customer, str) else customer["id"]),
            price=str(price["id"]) if price.get("id") else None,
            lookup_key=str(price["lookup_key"]) if price.get("lookup_key") else None,
        )

    def _options(
        self, event: UsageEvent, leg: Leg, api_key: str | None
    ) -> dict[str, Any] | WriteResult:
        key = api_key or self._api_key
        if not key:
            failure = StripeFailure(
                http_status=401,
                type="invalid_request_error",
                code="api_key_missing",
                message="No Stripe API key: set STRIPE_API_KEY (or send one through the proxy).",
            )
            return WriteResult(leg=leg, accepted=False, http_status=401, failure=failure)
        return {"api_key": key, "idempotency_key": event.idempotency_key(leg)}


def _as_dict(data: object) -> dict[str, Any]:
    return dict(data) if isinstance(data, Mapping) else {}


def _refused(leg: Leg, exc: stripe.StripeError) -> WriteResult:
    failure = failure_from_exception(exc)
    return WriteResult(leg=leg, accepted=False, http_status=failure.http_status, failure=failure)


def failure_from_exception(exc: stripe.StripeError) -> StripeFailure:
    """Classify a Stripe SDK exception, keeping Stripe's type, code and message (secrets masked)."""
    headers = {str(k).lower(): str(v) for k, v in (exc.headers or {}).items()}
    status = exc.http_status
    error: dict[str, Any] = {}
    if isinstance(exc.json_body, Mapping) and isinstance(exc.json_body.get("error"), Mapping):
        error = dict(exc.json_body["error"])
    network = isinstance(exc, stripe.APIConnectionError) and status is None
    should_retry = headers.get("stripe-should-retry")
    if should_retry == "true":
        retryable = True
    elif should_retry == "false":
        retryable = False
    else:
        retryable = network or status in (409, 429) or (status is not None and status >= 500)
    message = str(error.get("message") or exc.user_message or type(exc).__name__)
    if network:
        message = f"network error talking to Stripe: {_network_reason(exc)}"
    return StripeFailure(
        http_status=status,
        type=str(error.get("type") or ("api_connection_error" if network else "api_error")),
        code=str(error["code"]) if error.get("code") else None,
        message=redact(message),
        param=str(error["param"]) if error.get("param") else None,
        retryable=retryable,
        retry_after=_retry_after(headers.get("retry-after")),
        request_id=exc.request_id,
    )


def _network_reason(exc: stripe.StripeError) -> str:
    cause = exc.__cause__
    if isinstance(cause, TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    if cause is not None:
        return type(cause).__name__
    return "connection failed"


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
