"""Stripe reads for ``dualwrite reconcile``: Stripe's own totals on each path, and where they live.

* legacy usage record summaries of a subscription item (``raw_request_async`` at the pinned pre-basil
  ``legacy_api_version``: the SDK has no method for them any more), newest period first;
* the account's billing meters (event name → meter id, formula, pre-aggregation window);
* a meter's event summary for one customer over ``[start, end)`` (minute-aligned, as Stripe
  requires);
* a customer's subscription items, read at the legacy version so that legacy prices keep their
  ``aggregate_usage``;
* prices, with their tiers (``expand[]=tiers``: Stripe leaves them out otherwise), at the legacy
  version, each read once per reader (a price's amounts cannot change once it is used);
* an invoice preview of a subscription (``POST /v1/invoices/create_preview``), as it stands or with
  some items' prices swapped (``subscription_details[items]``, ``proration_behavior=none``).

Every call waits for the shared read limit first (``throttle``), follows ``starting_after`` through
every page, and turns Stripe's exceptions into ``StripeReadError`` carrying a ``StripeFailure``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import stripe

from dualwrite.config import StripeSettings
from dualwrite.exceptions import PriceError, StripeReadError
from dualwrite.pricing import Price
from dualwrite.stripe_io._failures import as_dict, failure_from_exception
from dualwrite.stripe_io._http import PooledAIOHTTPClient
from dualwrite.stripe_io._invoices import InvoicePreview, preview_from, swap_params

__all__ = [
    "MeterInfo",
    "ReadThrottle",
    "StripeReadError",
    "StripeReader",
    "SubscriptionItemInfo",
    "UsageSummary",
]

ReadThrottle = Callable[[], Awaitable[None]]
"""Waits for one unit of the shared read rate (``WriteLimits.take("reads", ...)``)."""

_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """One legacy ``usage_record_summary``: an item's total usage in one billing period."""

    id: str
    start: int | None
    """``period.start``: usage *after* this instant counts (Stripe's wording)."""
    end: int | None
    """``period.end``: usage up to and *including* this instant counts (Stripe's wording)."""
    total_usage: int
    invoice: str | None


@dataclass(frozen=True, slots=True)
class MeterInfo:
    """A billing meter, as far as comparing its totals goes."""

    id: str
    event_name: str
    formula: str
    event_time_window: str | None
    status: str


@dataclass(frozen=True, slots=True)
class SubscriptionItemInfo:
    """A subscription item of a customer and its price (read at the legacy API version)."""

    item: str
    subscription: str
    price: str | None
    lookup_key: str | None
    usage_type: str | None
    meter: str | None
    """The meter behind a meter-backed price (the item moved off the legacy system)."""
    aggregate_usage: str | None

    @property
    def legacy_metered(self) -> bool:
        """Whether the item is on a legacy metered price (metered, no meter)."""
        return self.usage_type == "metered" and self.meter is None


class StripeReader:
    """Reads Stripe's totals with the account's key, within the shared read rate.

    Args:
        settings: where Stripe is; ``legacy_api_version`` is sent on the legacy reads.
        api_key: the account's secret key.
        throttle: awaited before every request (none: unlimited).
        retries: the SDK's retries of a failed read (network, 409, 5xx; reads are safe to repeat).
    """

    def __init__(
        self,
        settings: StripeSettings,
        *,
        api_key: str,
        throttle: ReadThrottle | None = None,
        retries: int = 2,
    ):
        self._settings = settings
        self._api_key = api_key
        self._throttle = throttle
        self._http = PooledAIOHTTPClient(
            timeout=settings.timeout,
            max_connections=min(settings.max_connections, 32),
            verify_tls=settings.api_base.startswith("https://"),
        )
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": settings.api_base},
            http_client=self._http,
            max_network_retries=retries,
        )
        self.requests = 0
        """How many requests this reader made (pages included)."""
        self._prices: dict[str, Price | StripeReadError | PriceError] = {}
        self._price_locks: dict[str, asyncio.Lock] = {}

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.close_async()

    async def __aenter__(self) -> StripeReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _get(self, path: str, *, legacy: bool = False, **params: Any) -> dict[str, Any]:
        return await self._call("get", path, legacy=legacy, **params)

    async def _call(
        self, method: str, path: str, *, legacy: bool = False, **params: Any
    ) -> dict[str, Any]:
        if self._throttle is not None:
            await self._throttle()
        self.requests += 1
        options: dict[str, Any] = {"api_key": self._api_key}
        if legacy:
            options["stripe_version"] = self._settings.legacy_api_version
        try:
            response = await self._client.raw_request_async(method, path, **params, **options)
        except stripe.StripeError as exc:
            failure = failure_from_exception(exc)
            code = failure.code or failure.type
            verb = method.upper()
            msg = f"{verb} {path}: {failure.http_status or 'network'} {code}: {failure.message}"
            raise StripeReadError(msg, failure=failure) from exc
        return as_dict(response.data)

    async def _pages(
        self, path: str, *, legacy: bool = False, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Every object of a list endpoint, in Stripe's order, page after page."""
        cursor: str | None = None
        while True:
            page_params = dict(params, limit=_PAGE_SIZE)
            if cursor is not None:
                page_params["starting_after"] = cursor
            page = await self._get(path, legacy=legacy, **page_params)
            data = [as_dict(entry) for entry in page.get("data") or []]
            for entry in data:
                yield entry
            if not page.get("has_more") or not data:
                return
            cursor = str(data[-1]["id"])

    async def usage_summaries(self, item: str) -> AsyncIterator[UsageSummary]:
        """An item's usage record summaries, newest period first (the first is the open one).

        Raises:
            StripeReadError: Stripe refused the read.
        """
        path = f"/v1/subscription_items/{item}/usage_record_summaries"
        async for entry in self._pages(path, legacy=True):
            period = as_dict(entry.get("period"))
            yield UsageSummary(
                id=str(entry.get("id", "")),
                start=_int_or_none(period.get("start")),
                end=_int_or_none(period.get("end")),
                total_usage=int(entry.get("total_usage") or 0),
                invoice=str(entry["invoice"]) if entry.get("invoice") else None,
            )

    async def meters(self) -> list[MeterInfo]:
        """Every billing meter of the account (active and inactive).

        Raises:
            StripeReadError: Stripe refused the read.
        """
        found: list[MeterInfo] = []
        async for entry in self._pages("/v1/billing/meters"):
            aggregation = as_dict(entry.get("default_aggregation"))
            window = entry.get("event_time_window")
            found.append(
                MeterInfo(
                    id=str(entry["id"]),
                    event_name=str(entry.get("event_name", "")),
                    formula=str(aggregation.get("formula") or "sum"),
                    event_time_window=str(window) if window else None,
                    status=str(entry.get("status") or "active"),
                )
            )
        return found

    async def meter_total(self, meter: str, *, customer: str, start: int, end: int) -> float:
        """The meter's aggregated value for ``customer`` over ``[start, end)``.

        Raises:
            ValueError: ``start`` or ``end`` is not on a minute boundary, or the window is empty.
            StripeReadError: Stripe refused the read.
        """
        if start % 60 or end % 60 or end <= start:
            msg = f"a meter summary window must be minute-aligned and not empty: [{start}, {end})"
            raise ValueError(msg)
        total = 0.0
        path = f"/v1/billing/meters/{meter}/event_summaries"
        async for entry in self._pages(path, customer=customer, start_time=start, end_time=end):
            total += float(entry.get("aggregated_value") or 0)
        return total

    async def customer_items(self, customer: str) -> list[SubscriptionItemInfo]:
        """The items of every subscription of ``customer`` (any status), at the legacy version.

        Raises:
            StripeReadError: Stripe refused a read.
        """
        items: list[SubscriptionItemInfo] = []
        async for sub in self._pages(
            "/v1/subscriptions", legacy=True, customer=customer, status="all"
        ):
            listed = as_dict(sub.get("items"))
            entries = [as_dict(entry) for entry in listed.get("data") or []]
            if listed.get("has_more"):
                entries = [
                    entry
                    async for entry in self._pages(
                        "/v1/subscription_items", legacy=True, subscription=str(sub["id"])
                    )
                ]
            items += [_item_info(entry, str(sub["id"])) for entry in entries]
        return items

    async def price(self, price: str) -> Price:
        """A price with its tiers, at the legacy version (``recurring.aggregate_usage`` exists
        only there); read once per reader, whoever asks first.

        Raises:
            StripeReadError: Stripe refused the read.
            PriceError: the price cannot be turned into amounts (the message says why).
        """
        async with self._price_locks.setdefault(price, asyncio.Lock()):
            if price not in self._prices:
                try:
                    data = await self._get(f"/v1/prices/{price}", legacy=True, expand=["tiers"])
                    self._prices[price] = Price.from_stripe(data)
                except (StripeReadError, PriceError) as exc:
                    self._prices[price] = exc
        found = self._prices[price]
        if isinstance(found, Exception):
            raise found
        return found

    async def preview_invoice(
        self, subscription: str, *, swap: Mapping[str, str] | None = None
    ) -> InvoicePreview:
        """Stripe's preview of the subscription's next invoice: as it stands, or with the prices
        of some items swapped (``swap``: item id → new price; no prorations), at the legacy
        version (legacy metered items bill there).

        Raises:
            StripeReadError: Stripe refused the preview.
        """
        params: dict[str, Any] = {"subscription": subscription}
        if swap:
            params["subscription_details"] = swap_params(swap)
        data = await self._call("post", "/v1/invoices/create_preview", legacy=True, **params)
        return preview_from(data)


def _item_info(entry: dict[str, Any], subscription: str) -> SubscriptionItemInfo:
    price = as_dict(entry.get("price"))
    recurring = as_dict(price.get("recurring"))
    meter = recurring.get("meter")
    return SubscriptionItemInfo(
        item=str(entry["id"]),
        subscription=subscription,
        price=str(price["id"]) if price.get("id") else None,
        lookup_key=str(price["lookup_key"]) if price.get("lookup_key") else None,
        usage_type=str(recurring["usage_type"]) if recurring.get("usage_type") else None,
        meter=str(meter) if meter else None,
        aggregate_usage=(
            str(recurring["aggregate_usage"]) if recurring.get("aggregate_usage") else None
        ),
    )


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return int(value)
    return int(str(value)) if str(value).isdigit() else None
