"""The two writers, on the official ``stripe`` SDK: legacy usage records and meter events.

This is the only module that imports ``stripe``. Stripe's exceptions are turned into
``StripeFailure`` values here, once, classified as retryable or permanent:

* retryable: network errors and timeouts, 409 (lock or idempotency conflicts), 429, 5xx, and anything
  carrying ``Stripe-Should-Retry: true``;
* permanent: everything else, and anything carrying ``Stripe-Should-Retry: false``.

stripe-python 12+ has no usage-record methods, so the legacy writer calls the endpoint through
``raw_request_async`` with a pinned pre-basil ``Stripe-Version``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import stripe

from dualwrite.config import MeterMapping, StripeSettings
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.limits import RateLimitedError, WriteLimits
from dualwrite.models import Leg, StripeFailure, UsageEvent, WriteResult
from dualwrite.redaction import redact

__all__ = ["RETIRED_LEGACY_MARKER", "StripeWriter", "failure_from_exception"]

log = logging.getLogger(__name__)

#: Stripe's wording when a usage record is sent for an item already moved to a meter-backed price.
RETIRED_LEGACY_MARKER = "not on the legacy metered billing system"
_NO_KEY = "sk_unset_dualwrite"


class _PooledHTTPXClient(stripe.HTTPXClient):
    """The SDK's httpx client with a connection pool sized for the load.

    The SDK builds its ``httpx.AsyncClient`` with httpx's defaults (20 idle connections), which
    throttles a busy proxy or worker; this replaces it with one sized by ``max_connections``.
    """

    def __init__(self, *, timeout: float, max_connections: int, verify_tls: bool):
        super().__init__(timeout=timeout)
        self._default_async = self._client_async
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=stripe.ca_bundle_path) if verify_tls else False
        )
        self._client_async = httpx.AsyncClient(
            verify=verify,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    def _get_request_args_kwargs(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any
    ) -> list[Any]:
        # The SDK hands httpx its already-encoded body as ``data=``, which httpx deprecates for raw
        # content (a DeprecationWarning on every write); pass it as ``content=`` instead.
        args, kwargs = super()._get_request_args_kwargs(method, url, headers, post_data)
        if isinstance(kwargs.get("data"), str | bytes):
            kwargs["content"] = kwargs.pop("data")
        elif not kwargs.get("data"):
            kwargs.pop("data", None)
        return [args, kwargs]

    async def close_async(self) -> None:
        await self._client_async.aclose()
        await self._default_async.aclose()


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
        self._http = _PooledHTTPXClient(
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
    if isinstance(cause, httpx.TimeoutException):
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
