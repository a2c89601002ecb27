"""``AccountStripe``: the SDK client of the operator commands (cutover, meters, backfill).

One client with the account's key: requests go through ``raw_request_async``, by default at the
pinned pre-basil ``legacy_api_version`` (usage records and ``recurring.aggregate_usage`` exist only
there), lists are read page by page, and Stripe's exceptions become the command's
``StripeCallError`` here, once, carrying the ``StripeFailure`` (secrets masked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar, Self, cast

import stripe

from dualwrite.config import StripeSettings
from dualwrite.exceptions import StripeCallError
from dualwrite.stripe_io._failures import failure_from_exception
from dualwrite.stripe_io._http import PooledAIOHTTPClient

__all__ = ["AccountStripe", "StripeCallError"]

_PAGE = 100


class AccountStripe:
    """Raw Stripe calls with the account's key; subclasses name their error type (``error``).

    Args:
        settings: where Stripe is, and the pinned ``legacy_api_version``.
        api_key: the account's secret key (never logged or returned).
        max_connections: the connection pool's size.
    """

    error: ClassVar[type[StripeCallError]] = StripeCallError

    def __init__(self, settings: StripeSettings, *, api_key: str, max_connections: int = 4):
        self._version = settings.legacy_api_version
        self._http = PooledAIOHTTPClient(
            timeout=settings.timeout,
            max_connections=max_connections,
            verify_tls=settings.api_base.startswith("https://"),
        )
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": settings.api_base},
            http_client=self._http,
            max_network_retries=2,
        )
        self.calls = 0
        """How many calls (pages included) this client made."""

    @property
    def stripe_version(self) -> str:
        """The pinned API version calls are sent at (unless ``pinned=False``)."""
        return self._version

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.close_async()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        idempotency_key: str | None = None,
        pinned: bool = True,
        **params: Any,
    ) -> dict[str, Any]:
        """One call; its JSON body. ``pinned=False`` sends it at the SDK's own API version.

        Raises:
            StripeCallError: (``error``) Stripe refused the call or could not be reached.
        """
        options: dict[str, Any] = {"stripe_version": self._version} if pinned else {}
        if idempotency_key is not None:
            options["idempotency_key"] = idempotency_key
        self.calls += 1
        try:
            response = await self._client.raw_request_async(
                method.lower(), path, **params, **options
            )
        except stripe.StripeError as exc:
            failure = failure_from_exception(exc)
            code = failure.code or failure.type
            msg = f"{method} {path}: Stripe answered {failure.http_status or 'network error'} "
            raise self.error(msg + f"{code}: {failure.message}", failure=failure) from exc
        data = response.data
        return dict(cast(dict[str, Any], data)) if isinstance(data, dict) else {}

    async def list_all(
        self, path: str, *, pinned: bool = True, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Every object of a list endpoint, page after page (``starting_after`` the last id)."""
        cursor: str | None = None
        while True:
            query = dict(params, limit=_PAGE)
            if cursor is not None:
                query["starting_after"] = cursor
            page = await self.request("GET", path, pinned=pinned, **query)
            data = [dict(entry) for entry in page.get("data") or []]
            for entry in data:
                yield entry
            if not page.get("has_more") or not data:
                break
            cursor = str(data[-1]["id"])
