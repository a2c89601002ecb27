"""Reading a request body with a cap, for the front doors that read one whole (the middleware's
usage routes, the webhook receiver): nothing past the cap is read or kept."""

from __future__ import annotations

from starlette.types import Receive

__all__ = ["read_body"]


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` bytes (reading stops there).

    A caller that disconnects ends the body where it was.
    """
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)
