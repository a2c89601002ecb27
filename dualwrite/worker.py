"""A delivery worker as a process of its own (``dualwrite worker``).

Any number of these, on any machine, share one Redis and one consumer group with the workers that
run inside apps. Each checks Redis's durability settings at start and watches its data-loss
markers (``dualwrite.durability``), delivers outbox entries, claims what dead workers left
pending, replays the local spool and checks the guardrails (``[guardrails]``: divergence rolls
customers back). On SIGTERM or SIGINT it finishes the batch in hand and stops; whatever it had not
settled stays pending and another worker claims it.

With ``--metrics-port``, ``worker_endpoints`` serves ``/metrics`` and the health endpoints
(``dualwrite.health``) from a thread of their own, reading the worker through ``WorkerStatus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from dualwrite.config import Settings
from dualwrite.cutover import CutoverOps
from dualwrite.durability import DurabilityGuard
from dualwrite.engine import DualWriteEngine
from dualwrite.exceptions import DualwriteError
from dualwrite.health import PATHS, HealthCheck
from dualwrite.metrics import MetricsApp
from dualwrite.outbox import OutboxWorker

__all__ = ["WorkerStatus", "run_worker", "worker_endpoints"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerStatus:
    """A worker process as its health endpoints see it (``dualwrite.health.Watched``), kept
    current by ``run_worker``."""

    worker: OutboxWorker | None = None
    durability: DurabilityGuard | None = None
    stopping: bool = False


class _Endpoints:
    """``/metrics`` and the health endpoints of a worker process."""

    def __init__(self, settings: Settings, status: WorkerStatus) -> None:
        self.metrics = MetricsApp(settings)
        sampler = self.metrics.sampler
        if sampler is None:  # pragma: no cover - built from settings, it always reads Redis
            msg = "the metrics endpoint has no Redis reader"
            raise DualwriteError(msg)
        self.checks = HealthCheck(
            role="worker",
            watched=status,
            sampler=sampler,
            worker_expected=True,
            key_needed=True,
            has_key=settings.stripe_api_key_value() is not None,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PATHS:
            await self.checks(scope["path"], scope, receive, send)
        else:  # the lifespan too: it closes the sampler's Redis connection
            await self.metrics(scope, receive, send)


def worker_endpoints(settings: Settings, status: WorkerStatus) -> ASGIApp:
    """What ``dualwrite worker --metrics-port`` serves: ``/metrics``, and ``/_dualwrite/live``,
    ``/ready`` and ``/health`` about the worker ``status`` describes."""
    return _Endpoints(settings, status)


async def run_worker(
    settings: Settings,
    *,
    consumer: str | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    status: WorkerStatus | None = None,
) -> dict[str, int]:
    """Deliver outbox entries until ``stop`` is set (or SIGTERM/SIGINT arrives); returns the counts
    of what this worker did (accepted, retry, dead, skipped).

    Redis's durability settings are checked first and its data-loss markers watched throughout
    (``dualwrite.durability``). ``status`` is kept current for the health endpoints.

    Raises:
        RedisEvictionError: Redis may evict keys and ``[redis] allow_eviction`` is off.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Not possible outside the main thread (tests run workers in threads): stop is set instead.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    if not settings.stripe_api_key_value():
        log.warning("STRIPE_API_KEY is not set: every shadow write will be refused")
    status = status or WorkerStatus()
    engine = DualWriteEngine.from_settings(settings)
    durability = DurabilityGuard(engine.stores.redis, engine.stores.keys, settings.redis)
    status.durability = durability
    try:
        await durability.start()
        await engine.start(worker=False)  # this process's worker is started below, by name
        worker = engine.new_worker(consumer=consumer)
        await worker.start()
        status.worker = worker
        guard = _start_guard(settings, engine)
        if on_ready is not None:
            on_ready(worker.consumer)
        await stop.wait()
        status.stopping = True
        if guard is not None:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard
        await worker.aclose()
        return {str(name): count for name, count in worker.counts.items()}
    finally:
        status.stopping = True
        await durability.aclose()
        await engine.aclose()


def _start_guard(settings: Settings, engine: DualWriteEngine) -> asyncio.Task[None] | None:
    """The guardrail check (``dualwrite.cutover.Guard``), every ``[guardrails] interval_seconds``."""
    if not settings.guardrails.enabled:
        return None
    ops = CutoverOps(engine.stores.redis, engine.stores.keys, settings)
    return asyncio.create_task(ops.guard().run(), name="dualwrite-guard")
