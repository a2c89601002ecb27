"""The upstream connection pool: httpx's own transport, in shards of a few connections each.

httpcore (under httpx) walks every connection of a pool at the start and end of each request, and
checks each idle one for readability with a system call. With a few dozen connections in one pool
that walk costs more than the request itself: through the proxy, 16 concurrent callers got about
200 requests/s from one pool and about 450 from shards of four (single 3 s runs of the load in
``bench/proxy_overhead.py`` on 2 vCPUs; httpx2, whose pool has this fixed, got about 680).

Requests go to the first shard with a free connection, so that light traffic keeps reusing the
same few keep-alive connections (a new TLS connection to Stripe costs far more than any of this),
and heavy traffic spreads over the shards.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import httpx

__all__ = ["CONNECTIONS_PER_SHARD", "ShardedTransport"]

#: Connections one shard keeps; the scan per request is over at most this many.
CONNECTIONS_PER_SHARD = 4


class _Shard:
    """One httpx transport (one httpcore pool) and the requests it has in flight."""

    __slots__ = ("active", "capacity", "transport")

    def __init__(self, transport: httpx.AsyncHTTPTransport, capacity: int) -> None:
        self.transport = transport
        self.capacity = capacity
        self.active = 0


class _Released(httpx.AsyncByteStream):
    """A response body that gives its shard's slot back when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, shard: _Shard) -> None:
        self._stream = stream
        self._shard: _Shard | None = shard

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._shard is not None:
            self._shard.active -= 1
            self._shard = None
        await self._stream.aclose()


class ShardedTransport(httpx.AsyncBaseTransport):
    """``max_connections`` upstream connections in shards of ``CONNECTIONS_PER_SHARD``.

    Args:
        max_connections: connections over all shards.
        verify_tls: check the upstream's certificate (one SSL context, shared by the shards).
    """

    def __init__(self, *, max_connections: int, verify_tls: bool = True) -> None:
        verify: ssl.SSLContext | bool = httpx.create_ssl_context() if verify_tls else False
        self._shards: list[_Shard] = []
        remaining = max_connections
        while remaining > 0:
            size = min(CONNECTIONS_PER_SHARD, remaining)
            transport = httpx.AsyncHTTPTransport(
                verify=verify,
                trust_env=False,
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            )
            self._shards.append(_Shard(transport, size))
            remaining -= size

    def _pick(self) -> _Shard:
        for shard in self._shards:
            if shard.active < shard.capacity:
                return shard
        return min(self._shards, key=lambda shard: shard.active / shard.capacity)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = self._pick()
        shard.active += 1
        try:
            response = await shard.transport.handle_async_request(request)
        except BaseException:
            shard.active -= 1
            raise
        if isinstance(response.stream, httpx.AsyncByteStream):
            response.stream = _Released(response.stream, shard)
        else:  # pragma: no cover - an async transport always streams asynchronously
            shard.active -= 1
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.transport.aclose()
