"""The ``/_standin/*`` control endpoints: JSON, no API key, for demos and other processes.

* ``GET /_standin/state``: the clock, object counts, per-customer meter totals, per-item legacy totals.
* ``POST /_standin/clock/advance`` ``{"seconds": N}`` and ``POST /_standin/clock/set``
  ``{"timestamp": T}``.
* ``POST /_standin/faults`` with ``FaultInjector.configure``'s options; ``POST /_standin/faults/clear``.
* ``POST /_standin/requests/reset``: empty the request log.
* ``POST /_standin/meter_sessions/expire``: end every meter event session now.
* ``POST /_standin/event_destinations`` ``{"url": U, "secret": S}``: receive later error reports.
* ``POST /_standin/meter_errors/refuse`` ``{"identifier": I, "code"?: C, "message"?: M}``: refuse
  an accepted meter event late.
* ``POST /_standin/meter_errors/report``: send the error reports (``{"events": [...]}``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stripe_standin._errors import StandinError

if TYPE_CHECKING:
    from stripe_standin._standin import StripeStandin

__all__ = ["control_routes"]

_FAULT_OPTIONS = frozenset({"rate", "kinds", "paths", "seed", "timeout_seconds"})


def _refuse(message: str) -> Response:
    return JSONResponse({"error": {"type": "invalid_request_error", "message": message}}, 400)


async def _json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body (an empty body counts as ``{}``)."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError as exc:
        msg = f"the body must be a JSON object: {exc}"
        raise StandinError(msg) from exc
    if not isinstance(data, dict):
        msg = "the body must be a JSON object"
        raise StandinError(msg)
    return data


def _integer(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"`{name}` must be an integer, got {value!r}"
        raise StandinError(msg)
    return value


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        msg = f"`{name}` must be a string, got {value!r}"
        raise StandinError(msg)
    return value


def _optional_text(data: dict[str, Any], name: str) -> str | None:
    return None if data.get(name) is None else _text(data, name)


def control_routes(standin: StripeStandin) -> list[Route]:
    """The control routes, bound to ``standin``."""

    async def state(request: Request) -> Response:
        """GET /_standin/state."""
        return JSONResponse(standin.state())

    async def advance(request: Request) -> Response:
        """POST /_standin/clock/advance ``{"seconds": N}``."""
        try:
            seconds = _integer(await _json_object(request), "seconds")
            now = standin.clock.advance(seconds)
        except StandinError as exc:
            return _refuse(str(exc))
        return JSONResponse({"clock": now})

    async def set_clock(request: Request) -> Response:
        """POST /_standin/clock/set ``{"timestamp": T}``."""
        try:
            standin.clock.set(_integer(await _json_object(request), "timestamp"))
        except StandinError as exc:
            return _refuse(str(exc))
        return JSONResponse({"clock": standin.clock.now()})

    async def faults(request: Request) -> Response:
        """POST /_standin/faults with ``FaultInjector.configure``'s options."""
        try:
            data = await _json_object(request)
            unknown = sorted(set(data) - _FAULT_OPTIONS)
            if unknown:
                msg = f"unknown fault options {unknown}; known: {sorted(_FAULT_OPTIONS)}"
                raise StandinError(msg)
            if "rate" not in data:
                msg = "`rate` is required"
                raise StandinError(msg)
            standin.faults.configure(**data)
        except (StandinError, TypeError) as exc:
            return _refuse(str(exc))
        return JSONResponse({"faults": standin.faults.describe()})

    async def clear_faults(request: Request) -> Response:
        """POST /_standin/faults/clear."""
        standin.faults.clear()
        return JSONResponse({"faults": standin.faults.describe()})

    async def reset_requests(request: Request) -> Response:
        """POST /_standin/requests/reset."""
        standin.reset_requests()
        return JSONResponse({"requests": 0})

    async def expire_sessions(request: Request) -> Response:
        """POST /_standin/meter_sessions/expire."""
        return JSONResponse({"expired": standin.expire_meter_sessions()})

    async def add_destination(request: Request) -> Response:
        """POST /_standin/event_destinations ``{"url": U, "secret": S}``."""
        try:
            data = await _json_object(request)
            url = _text(data, "url")
            destination = standin.add_event_destination(url, _text(data, "secret"))
        except StandinError as exc:
            return _refuse(str(exc))
        return JSONResponse({"id": destination, "url": url})

    async def refuse_later(request: Request) -> Response:
        """POST /_standin/meter_errors/refuse ``{"identifier": I, "code"?: C, "message"?: M}``."""
        try:
            data = await _json_object(request)
            code = _optional_text(data, "code") or "meter_event_customer_not_found"
            error = standin.refuse_later(
                _text(data, "identifier"), code=code, message=_optional_text(data, "message")
            )
        except StandinError as exc:
            return _refuse(str(exc))
        return JSONResponse({"error": error})

    async def report(request: Request) -> Response:
        """POST /_standin/meter_errors/report: deliveries run on a worker thread, so this server
        stays free to answer the receivers that fetch the events meanwhile."""
        events = await anyio.to_thread.run_sync(standin.report_meter_errors)
        return JSONResponse({"events": events})

    return [
        Route("/_standin/state", state, methods=["GET"]),
        Route("/_standin/meter_sessions/expire", expire_sessions, methods=["POST"]),
        Route("/_standin/event_destinations", add_destination, methods=["POST"]),
        Route("/_standin/meter_errors/refuse", refuse_later, methods=["POST"]),
        Route("/_standin/meter_errors/report", report, methods=["POST"]),
        Route("/_standin/clock/advance", advance, methods=["POST"]),
        Route("/_standin/clock/set", set_clock, methods=["POST"]),
        Route("/_standin/faults", faults, methods=["POST"]),
        Route("/_standin/faults/clear", clear_faults, methods=["POST"]),
        Route("/_standin/requests/reset", reset_requests, methods=["POST"]),
    ]
