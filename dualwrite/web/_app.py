"""``report_app()``: the report pages as a Starlette app, behind ``TokenGate``.

Pages (paths below the mount point, ``/_dualwrite`` in the proxy):

* ``/``: customers per stage and status, both legs' totals, divergences over time, the customer
  table (filters through a GET form: customer, stage, period, only divergent; sort; pages of 200);
* ``/customers/{customer}``: its lines per period and meter event name, its latest divergent
  events with both legs' Stripe ids and errors, its flag history;
* ``/flags``: the flag audit log, newest first, and the global flags now.

Everything is read through ``build_report()`` and the ledger's and flag store's public readers;
Redis being unreachable gives a 503 page that says so, and nothing more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine, StageSource
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.flags import RedisFlagStore, Resolution, StageResolver
from dualwrite.ledger import Ledger, period_score
from dualwrite.models import Stage
from dualwrite.outbox import Outbox
from dualwrite.reconcile import read_reconciliation
from dualwrite.redaction import redact
from dualwrite.report import build_report
from dualwrite.stores import Stores
from dualwrite.web._auth import TokenGate
from dualwrite.web._chart import divergence_chart
from dualwrite.web._progress import migration_progress
from dualwrite.web._render import page
from dualwrite.web._views import (
    PAGE_SIZE,
    BadQueryError,
    Filters,
    parse_count,
    period_lines,
    sort_customers,
    summarise,
)

__all__ = ["CHART_ENTRIES", "ReportApp", "report_app"]

log = logging.getLogger("dualwrite.web")

#: Divergence log entries read for the overview's chart (the newest; the page says when capped).
CHART_ENTRIES = 5000
#: Divergent events listed on the overview and on a customer's page.
LATEST_DIVERGENCES = 20
CUSTOMER_DIVERGENCES = 50
CUSTOMER_HISTORY = 50
#: Flag history entries per page (``?limit=`` up to ``MAX_HISTORY``).
HISTORY = 200
MAX_HISTORY = 2000
#: Days the migration-progress page goes back.
PROGRESS_DAYS = 14


@dataclass(frozen=True, slots=True)
class _Source:
    """Where the pages read from: an engine's Redis, ledger and resolver, or ones of their own."""

    redis: aioredis.Redis
    ledger: Ledger
    resolver: StageSource
    outbox: Outbox
    flags: RedisFlagStore
    owned: bool

    @classmethod
    def of(cls, settings: Settings, engine: DualWriteEngine | None) -> _Source:
        if engine is not None:
            stores = engine.stores
            return cls(
                redis=stores.redis,
                ledger=stores.ledger,
                resolver=engine.resolver,
                outbox=stores.outbox,
                flags=stores.flags,
                owned=False,
            )
        stores = Stores.open(settings, max_connections=32)
        return cls(
            redis=stores.redis,
            ledger=stores.ledger,
            # Not subscribed to flag changes: resolutions are cached for flags.cache_ttl at most.
            resolver=StageResolver(stores.redis, stores.keys, settings.flags),
            outbox=stores.outbox,
            flags=stores.flags,
            owned=True,
        )


class _Pages:
    """The page handlers, over one ``_Source``."""

    def __init__(self, source: _Source, settings: Settings) -> None:
        self.source = source
        self.report_settings = settings.report
        self.flag_salt = settings.flags.rollout_salt

    async def overview(self, request: Request) -> Response:
        filters = _filters(request)
        source = self.source
        report = await build_report(
            source.ledger,
            source.resolver,
            outbox=source.outbox,
            since=filters.since,
            until=filters.until,
            customer=filters.customer,
            stage=filters.stage,
            only_divergent=filters.divergent,
            divergence_limit=CHART_ENTRIES,
            settings=self.report_settings,
        )
        customers = sort_customers(report.customers, filters.sort)
        pages = max(1, -(-len(customers) // PAGE_SIZE))
        current = min(filters.page, pages)
        shown = customers[(current - 1) * PAGE_SIZE : current * PAGE_SIZE]
        return page(
            "overview.html",
            root=_root(request),
            nav="overview",
            report=report,
            generated_at=report.generated_at,
            redis_warnings=report.redis_warnings,
            filters=filters,
            stages=[stage.value for stage in Stage],
            summary=summarise(report),
            chart=divergence_chart(report.divergences, now=report.generated_at),
            chart_capped=len(report.divergences) >= CHART_ENTRIES,
            customers=shown,
            page_number=current,
            pages=pages,
            first_index=(current - 1) * PAGE_SIZE,
            latest=report.divergences[:LATEST_DIVERGENCES],
        )

    async def customer(self, request: Request) -> Response:
        customer = request.path_params["customer"]
        source = self.source
        report = await build_report(
            source.ledger,
            source.resolver,
            customer=customer,
            divergence_limit=CUSTOMER_DIVERGENCES,
            settings=self.report_settings,
        )
        rows = await source.ledger.rows(customer=customer)
        reconciled = await read_reconciliation(
            source.ledger.redis, source.ledger.keys, customer=customer
        )
        history = await source.flags.history(customer=customer, limit=CUSTOMER_HISTORY)
        line = report.customers[0] if report.customers else None
        if line is None and not report.divergences and not history:
            raise HTTPException(404, f"Nothing is recorded for customer {customer}.")
        resolution: Resolution | None = None
        if isinstance(source.resolver, StageResolver):
            resolution = await source.resolver.explain(customer)
        return page(
            "customer.html",
            root=_root(request),
            nav="customer",
            generated_at=report.generated_at,
            redis_warnings=report.redis_warnings,
            customer=customer,
            line=line,
            resolution=resolution,
            periods=period_lines(rows),
            reconciled=sorted(
                reconciled, key=lambda record: period_score(record.period), reverse=True
            ),
            divergences=report.divergences,
            history=history,
            readiness_rule=report.readiness_rule,
        )

    async def progress(self, request: Request) -> Response:
        source = self.source
        report = await build_report(
            source.ledger, source.resolver, divergence_limit=0, settings=self.report_settings
        )
        customers = {line.customer for line in report.customers}
        customers |= set(await source.flags.overrides()) | set(await source.flags.schedules())
        now = time.time()
        days = await migration_progress(
            source.flags, sorted(customers), now=now, salt=self.flag_salt, days=PROGRESS_DAYS
        )
        return page(
            "progress.html",
            root=_root(request),
            nav="progress",
            generated_at=now,
            days=days,
            stages=[stage.value for stage in Stage],
            customers=len(customers),
        )

    async def flags(self, request: Request) -> Response:
        customer = request.query_params.get("customer", "").strip() or None
        limit_text = request.query_params.get("limit", "") or str(HISTORY)
        try:
            limit = parse_count(limit_text, name="limit", low=1, high=MAX_HISTORY)
        except BadQueryError as exc:
            raise HTTPException(400, str(exc)) from None
        flags = self.source.flags
        history = await flags.history(customer=customer, limit=limit)
        return page(
            "flags.html",
            root=_root(request),
            nav="flags",
            generated_at=time.time(),
            customer=customer,
            limit=limit,
            history=history,
            default=await flags.get_default(),
            kill=await flags.get_kill(),
            rollout=await flags.get_rollout(),
        )


def _root(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root


def _filters(request: Request) -> Filters:
    try:
        return Filters.parse(request.query_params)
    except BadQueryError as exc:
        raise HTTPException(400, str(exc)) from None


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed"}
    return page(
        "message.html",
        root=_root(request),
        nav="error",
        status=status,
        headers=exc.headers if isinstance(exc, HTTPException) else None,
        title=titles.get(status, "Error"),
        message=exc.detail if isinstance(exc, HTTPException) else "",
    )


async def _unavailable(request: Request, exc: Exception) -> Response:
    # The message names the action only (never the server's address); it goes to the log, and the
    # page says no more than what is wrong.
    log.warning("report page: %s", redact(str(exc)))
    return page(
        "message.html",
        root=_root(request),
        nav="error",
        status=503,
        headers={"Retry-After": "10"},
        title="Redis is unavailable",
        message=(
            "The report cannot be read because Redis does not answer. Try this page again "
            "shortly; the proxy's health endpoint says when Redis is back."
        ),
    )


class ReportApp:
    """The report pages as an ASGI app, behind the ``DUALWRITE_REPORT_TOKEN`` bearer token.

    Mount it in any Starlette (or FastAPI) app with ``Mount("/_dualwrite", report_app(settings))``;
    ``dualwrite serve`` serves it under ``/_dualwrite/``.

    Args:
        settings: Redis, the flags' and the report's settings, and the report token.
        engine: an engine whose Redis connection, ledger and stage resolver to share (the proxy's,
            the middleware's); whoever built it closes it. Without one the app opens its own Redis
            connection, closed by ``aclose()`` or at the end of the app's lifespan (a mounted app
            gets no lifespan of its own: call ``aclose()`` from the outer app's).
    """

    def __init__(self, settings: Settings, *, engine: DualWriteEngine | None = None) -> None:
        self._source = _Source.of(settings, engine)
        pages = _Pages(self._source, settings)

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await self.aclose()

        pages_app = Starlette(
            routes=[
                Route("/", pages.overview, name="overview"),
                Route("/customers/{customer:path}", pages.customer, name="customer"),
                Route("/flags", pages.flags, name="flags"),
                Route("/progress", pages.progress, name="progress"),
            ],
            exception_handlers={HTTPException: _http_error, StoreUnavailableError: _unavailable},
            lifespan=lifespan,
        )
        self._app = TokenGate(pages_app, settings.report_token_value())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def aclose(self) -> None:
        """Close the Redis connection the app opened (none when it shares an engine's)."""
        if self._source.owned:
            await self._source.redis.aclose()

    async def __aenter__(self) -> ReportApp:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def report_app(settings: Settings, *, engine: DualWriteEngine | None = None) -> ReportApp:
    """The report pages as an ASGI app (the arguments are ``ReportApp``'s)."""
    return ReportApp(settings, engine=engine)
