"""A Starlette app behind dualwrite's ASGI middleware: ``uvicorn examples.starlette_app:app``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dualwrite import DualWriteMiddleware, RecordOutcome, Settings


async def report_usage(request: Request) -> JSONResponse:
    outcome: RecordOutcome = request.state.dualwrite  # the writes are already made
    return JSONResponse(
        {"recorded": outcome.accepted, "stripe_id": outcome.authoritative.stripe_id}
    )


routes = [Route("/api/usage/{customer}", report_usage, methods=["POST"])]
# Settings from DUALWRITE_CONFIG and the environment; or Settings.load("dualwrite.toml").
app = DualWriteMiddleware(Starlette(routes=routes), config=Settings.load())
