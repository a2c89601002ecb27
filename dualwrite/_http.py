"""Shared by the front doors: Stripe-shaped error replies (``stripe_error``), and reading a request
body with a cap for those that read one whole (the middleware's usage routes, the webhook
receiver): nothing past the cap is read or kept."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Receive

__all__ = ["read_body", "stripe_error"]


def stripe_error(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A response with Stripe's error shape: ``{"error": {"type", "message", "code", "param"}}``."""
    error: dict[str, Any] = {"type": error_type, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return JSONResponse({"error": error}, status_code=status, headers=headers)


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
