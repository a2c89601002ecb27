"""``install(stripe or a StripeClient, recorder)``: usage records created through the Stripe SDK are
dual-written in-process, at the customer's stage.

For code that calls the SDK deep inside itself: ``stripe.SubscriptionItem.create_usage_record(...)``
and ``client.subscription_items.usage_records.create(...)`` (stripe-python 11.x and older), or
``client.raw_request("post", "/v1/subscription_items/{si}/usage_records", ...)`` (12+, which has no
usage-record methods). The hook wraps the SDK's HTTP client: every request but usage-record
creation goes to Stripe through the SDK's own client, unchanged; a usage record is handed to the
proxy's interception (``dualwrite.proxy``), in this process, on a ``SyncRecorder``. So it behaves
as the proxy does: the subscription item is mapped to its customer and meter (``[items]``, else
``[[meters]] legacy_prices`` / ``lookup_keys`` and one read of the item), the SDK's own request goes
to Stripe unchanged when legacy is authoritative (its reply is what the SDK gets), and a
``usage_record``-shaped reply stands in for it when the meter is authoritative.

The SDK's retries wrap the hook, so they keep their meaning: each attempt carries the SDK's one
Idempotency-Key, the event's identifier, so a retried call records once. Network errors on the way
to Stripe reach the SDK as its own ``APIConnectionError``. The SDK and dualwrite's own writers
never share an HTTP client, so dualwrite's writes are never intercepted.

This module imports ``stripe`` to wrap the caller's SDK client; dualwrite's own Stripe calls stay
in ``dualwrite.stripe_io``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import stripe
from starlette.types import Message
from stripe import _http_client

from dualwrite.exceptions import ConfigError
from dualwrite.models import StripeFailure
from dualwrite.proxy import DEFAULT_MAX_USAGE_BODY_BYTES, ItemResolver
from dualwrite.proxy._upstream import Upstream, UpstreamReply
from dualwrite.proxy._usage import USAGE_PATH_RE, UsageInterceptor
from dualwrite.recorder import Recorder, SyncRecorder

__all__ = ["DualWriteHTTPClient", "install", "uninstall"]

_Reply = tuple[Any, int, Mapping[str, str]]
"""What a stripe-python HTTP client returns: body, status and (case-insensitive) headers."""
_SCOPE_CALL = "dualwrite.sdk_call"


class _SDKCall:
    """One intercepted SDK request: how to send it to Stripe unchanged, and what came back."""

    __slots__ = ("_send", "error", "reply")

    def __init__(self, send: Callable[[], Awaitable[_Reply]]):
        self._send = send
        self.reply: _Reply | None = None
        self.error: stripe.APIConnectionError | None = None

    async def exchange(self) -> UpstreamReply:
        """Send the SDK's request through the SDK's own client, once (the SDK retries)."""
        try:
            self.reply = content, status, headers = await self._send()
        except stripe.APIConnectionError as exc:
            self.error = exc
            failure = StripeFailure(
                type="api_connection_error",
                message="network error talking to Stripe",
                retryable=exc.should_retry,
            )
            return UpstreamReply(502, [], b"", failure)
        body = content if isinstance(content, bytes) else str(content).encode()
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        return UpstreamReply(status, raw, body)


class _SDKUpstream(Upstream):
    """The interception's "upstream": the SDK's own HTTP client, for the request in hand."""

    async def exchange(self, scope: Any, *, raw_target: bytes, body: bytes) -> UpstreamReply:
        """Send the intercepted request as the SDK made it (``raw_target`` and ``body`` are its)."""
        call: _SDKCall = scope[_SCOPE_CALL]
        return await call.exchange()


class DualWriteHTTPClient(stripe.HTTPClient):
    """A stripe-python HTTP client that dual-writes usage-record creation and hands every other
    request to ``inner`` (the SDK's own client) unchanged. Made by ``install``."""

    name = "dualwrite"

    def __init__(self, inner: stripe.HTTPClient, recorder: SyncRecorder):
        super().__init__()
        self.inner = inner
        self.recorder = recorder
        self._interceptors: weakref.WeakKeyDictionary[Recorder, UsageInterceptor] = (
            weakref.WeakKeyDictionary()
        )

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> _Reply:
        """One attempt of an SDK request (the SDK's ``request_with_retries`` repeats it)."""
        item = _usage_item(method, url)
        if item is None:
            return self.inner.request(method, url, headers, post_data)

        async def send() -> _Reply:
            return await asyncio.to_thread(self.inner.request, method, url, headers, post_data)

        call = _SDKCall(send)
        return self.recorder.run(
            lambda recorder: self._intercept(recorder, call, item, url, headers, post_data)
        )

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> _Reply:
        """``request`` for the SDK's ``*_async`` methods, on the caller's event loop."""
        item = _usage_item(method, url)
        if item is None:
            return await self.inner.request_async(method, url, headers, post_data)
        caller = asyncio.get_running_loop()

        async def send() -> _Reply:
            # The SDK's async client belongs to the caller's loop: it sends from there.
            request = self.inner.request_async(method, url, headers, post_data)
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(request, caller))

        call = _SDKCall(send)
        return await self.recorder.run_async(
            lambda recorder: self._intercept(recorder, call, item, url, headers, post_data)
        )

    def request_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        """Streamed requests (never usage records) go to the SDK's client."""
        return self.inner.request_stream(method, url, headers, post_data)

    async def request_stream_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[Any, int, Mapping[str, str]]:
        """Streamed requests (never usage records) go to the SDK's client."""
        return await self.inner.request_stream_async(method, url, headers, post_data)

    def close(self) -> None:
        """Close the SDK's client."""
        self.inner.close()  # type: ignore[no-untyped-call]  # untyped in the SDK

    async def close_async(self) -> None:
        """Close the SDK's async client."""
        await self.inner.close_async()  # type: ignore[no-untyped-call]  # untyped in the SDK

    def sleep_async(self, secs: float) -> Awaitable[None]:
        """The SDK's async client's sleep (between its retries)."""
        return self.inner.sleep_async(secs)

    async def _intercept(
        self,
        recorder: Recorder,
        call: _SDKCall,
        item: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any,
    ) -> _Reply:
        """Run the proxy's interception on the recorder's loop; the reply the SDK gets."""
        interceptor = self._interceptors.get(recorder)
        if interceptor is None:
            interceptor = self._interceptors[recorder] = _interceptor(recorder)
        target = urlsplit(url)
        body = post_data if isinstance(post_data, bytes) else str(post_data or "").encode()
        scope = {
            "type": "http",
            "method": "POST",
            "path": unquote(target.path),
            "headers": [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in (headers or {}).items()
            ],
            _SCOPE_CALL: call,
        }
        reply: dict[str, Any] = {"status": 500, "headers": [], "body": b""}

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply["status"] = message["status"]
                reply["headers"] = message.get("headers", [])
            else:
                reply["body"] += message.get("body", b"")

        await interceptor(scope, receive, send, item=item, raw_target=target.path.encode())
        if call.error is not None:
            raise call.error  # no reply from Stripe: the SDK decides whether to retry
        if call.reply is not None and call.reply[1] == reply["status"]:
            return call.reply  # Stripe's own reply, as the SDK's client returned it
        names = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in reply["headers"]]
        return reply["body"], reply["status"], httpx.Headers(names)


def _interceptor(recorder: Recorder) -> UsageInterceptor:
    """The proxy's usage-record interception on ``recorder``'s engine (one per process)."""
    engine, settings = recorder.engine, recorder.settings
    stores = engine.stores
    return UsageInterceptor(
        engine,
        _SDKUpstream(settings.stripe),
        ItemResolver(settings, redis=stores.redis, keys=stores.keys, lookup=engine),
        max_body=DEFAULT_MAX_USAGE_BODY_BYTES,
        legacy_api_version=settings.stripe.legacy_api_version,
    )


def _usage_item(method: str, url: str) -> str | None:
    """The subscription item of a usage-record creation request, else None."""
    if method.lower() != "post" or not url.endswith("/usage_records"):
        return None
    found = USAGE_PATH_RE.fullmatch(unquote(urlsplit(url).path))
    return None if found is None else found["item"]


def install(
    target: ModuleType | stripe.StripeClient, recorder: SyncRecorder
) -> DualWriteHTTPClient:
    """Dual-write the usage records ``target`` creates: the ``stripe`` module (its module-level
    calls, e.g. ``stripe.SubscriptionItem.create_usage_record``) or a ``StripeClient``. Installing
    again replaces the recorder.

    Raises:
        ConfigError: ``target`` is neither the ``stripe`` module nor a ``StripeClient``.
    """
    inner = _current(target)
    if isinstance(inner, DualWriteHTTPClient):
        inner = inner.inner
    hooked = DualWriteHTTPClient(inner, recorder)
    _replace(target, hooked)
    return hooked


def uninstall(target: ModuleType | stripe.StripeClient) -> None:
    """Give ``target`` its own HTTP client back (nothing happens if the hook is not installed)."""
    current = _current(target)
    if isinstance(current, DualWriteHTTPClient):
        _replace(target, current.inner)


def _current(target: ModuleType | stripe.StripeClient) -> stripe.HTTPClient:
    if target is stripe:
        if stripe.default_http_client is None:
            # What the SDK itself makes at its first module-level request.
            options: dict[str, Any] = {
                "verify_ssl_certs": stripe.verify_ssl_certs,
                "proxy": stripe.proxy,
            }
            stripe.default_http_client = _http_client.new_default_http_client(
                async_fallback_client=_http_client.new_http_client_async_fallback(**options),
                **options,
            )
        return stripe.default_http_client
    if isinstance(target, stripe.StripeClient):
        client = target._requestor._client
        if client is not None:
            return client
    msg = (
        f"install() takes the stripe module or a stripe.StripeClient, not {type(target).__name__}; "
        "call install(stripe, recorder) for module-level calls, install(client, recorder) for "
        "a StripeClient"
    )
    raise ConfigError(msg)


def _replace(target: ModuleType | stripe.StripeClient, client: stripe.HTTPClient) -> None:
    if target is stripe:
        stripe.default_http_client = client
    elif isinstance(target, stripe.StripeClient):
        target._requestor._client = client
