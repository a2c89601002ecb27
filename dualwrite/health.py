"""Liveness, readiness and the detailed health view: one rule for every process that serves them.

The proxy (``dualwrite serve``) and ``DualWriteMiddleware`` (under the app's own paths) answer
them, and so does ``dualwrite worker --metrics-port`` beside ``/metrics``:

* ``/_dualwrite/live``: the process answers. Nothing is read and nothing can fail it: the liveness
  probe (a failing liveness probe restarts the container, which cures none of the conditions
  below).
* ``/_dualwrite/ready``: 200 while the process should get traffic, 503 while it cannot do its job
  and another process could: the readiness probe.
* ``/_dualwrite/health``: the detailed view for people and monitoring: ``status`` (``ok``,
  ``degraded``, ``unavailable``), the outbox's depth and oldest entry, Redis's durability, the
  worker, every problem and warning; 503 only when Redis does not answer.

Which conditions make readiness 503 (``blocking``) is the point. A probe that fails on something
every replica shares (Redis down, Stripe failing, a stuck outbox) takes every replica out of
rotation at once, and for the proxy that is every Stripe call the app makes. The front doors keep
serving usage while Redis is down (the authoritative write still happens and the commit is
spooled on local disk), so they block only on what is this process's own:

* ``stopping``: the server is shutting down (its worker has stopped);
* ``stripe_key_missing``: ``STRIPE_API_KEY`` is not in this process's environment (the
  middleware refuses usage with 503 without it; the proxy's shadow writes and recoveries fail):
  a rollout with a broken environment never gets traffic;
* ``worker_stopped``: the in-process outbox worker (``[outbox] run_in_process``) is not running.

A worker process serves no traffic: its readiness says whether it delivers, so it is also not
ready while it starts (``starting``), while Redis does not answer (``redis_unavailable``) or
while its rounds fail (``worker_failing``).

Everything else found is a problem that makes the status ``degraded`` and leaves the answer 200:
``redis_unavailable`` and ``worker_failing`` (front doors), ``redis_data_lost``, ``outbox_stuck``
(the oldest outstanding entry is older than ``STUCK_SECONDS``, the alert's 15 minutes) and
``spool_full`` (this process refuses new usage with a retryable 503 until Redis is back).
Settings that risk data are ``warnings`` (``dualwrite.durability``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from redis.exceptions import RedisError
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from dualwrite._http import stripe_error
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.metrics import OutboxReading, OutboxSampler

if TYPE_CHECKING:
    from dualwrite.durability import DurabilityGuard
    from dualwrite.outbox import OutboxWorker
    from dualwrite.spool import Spool

__all__ = [
    "BLOCKING",
    "CHECK_TIMEOUT",
    "HEALTH_PATH",
    "LIVE_PATH",
    "PATHS",
    "READY_PATH",
    "STUCK_SECONDS",
    "HealthCheck",
    "Role",
    "Watched",
]

LIVE_PATH = "/_dualwrite/live"
READY_PATH = "/_dualwrite/ready"
HEALTH_PATH = "/_dualwrite/health"
PATHS = frozenset({LIVE_PATH, READY_PATH, HEALTH_PATH})
#: An outstanding outbox entry older than this makes the outbox ``stuck`` (the alert's threshold).
STUCK_SECONDS = 15 * 60.0
#: The longest a readiness or health check waits for Redis.
CHECK_TIMEOUT = 2.0

#: What the process is: the two front doors serve traffic, a worker delivers.
Role = Literal["proxy", "middleware", "worker"]

_OWN = frozenset({"starting", "stopping", "stripe_key_missing", "worker_stopped"})
#: The problems that make readiness 503, per role (the rest make it ``degraded``).
BLOCKING: dict[Role, frozenset[str]] = {
    "proxy": _OWN,
    "middleware": _OWN,
    "worker": _OWN | {"redis_unavailable", "worker_failing"},
}
_WORKER_STATES = {"healthy": "running", "failing": "failing"}
_WORKER_PROBLEMS = {
    "starting": "starting",
    "stopped": "worker_stopped",
    "failing": "worker_failing",
}


class Watched(Protocol):
    """What the checks read about the process they watch, as it is at each check."""

    @property
    def worker(self) -> OutboxWorker | None:
        """The process's outbox worker (None: none started)."""
        ...

    @property
    def durability(self) -> DurabilityGuard | None:
        """The process's durability guard (None: it has none)."""
        ...

    @property
    def stopping(self) -> bool:
        """Whether the process is shutting down."""
        ...


@dataclass(slots=True)
class _Findings:
    """What one check found."""

    worker: str
    reading: OutboxReading | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    durability: dict[str, Any] = field(default_factory=dict)


class HealthCheck:
    """The three endpoints of one process.

    Args:
        role: what the process is (which problems block readiness: ``BLOCKING``).
        watched: the process (its worker, its durability guard, whether it is stopping).
        sampler: reads the outbox (and so finds whether Redis answers).
        worker_expected: whether an outbox worker should be running (``off`` otherwise).
        key_needed: whether ``STRIPE_API_KEY`` is needed (a middleware without usage routes
            makes no Stripe call).
        has_key: whether ``STRIPE_API_KEY`` is set.
        spool: the local spool of commits made while Redis is down.
        prepare: run before each check unless stopping (starts an engine that no lifespan
            started, as the first usage request would).
    """

    def __init__(
        self,
        *,
        role: Role,
        watched: Watched,
        sampler: OutboxSampler,
        worker_expected: bool,
        key_needed: bool,
        has_key: bool,
        spool: Spool | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.role: Role = role
        self._watched = watched
        self._sampler = sampler
        self._worker_expected = worker_expected
        self._key_missing = key_needed and not has_key
        self._spool = spool
        self._prepare = prepare

    async def __call__(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer ``path`` (one of ``PATHS``)."""
        if scope["method"] not in ("GET", "HEAD"):
            response = stripe_error(405, f"{path} answers GET only.")
        else:
            if path == LIVE_PATH:
                status, body = self.live()
            elif path == READY_PATH:
                status, body = await self.ready()
            else:
                status, body = await self.health()
            response = JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
        await response(scope, receive, send)

    def live(self) -> tuple[int, dict[str, Any]]:
        """Liveness: always 200 (the process answered)."""
        return 200, {"status": "ok"}

    async def ready(self) -> tuple[int, dict[str, Any]]:
        """Readiness: 503 with the ``blocking`` problems, else 200 (``ready`` or ``degraded``)."""
        found = await self._check()
        blocking = [problem for problem in found.problems if problem in BLOCKING[self.role]]
        status = "not_ready" if blocking else "degraded" if found.problems else "ready"
        body = {
            "status": status,
            "role": self.role,
            "blocking": blocking,
            "problems": found.problems,
            "warnings": found.warnings,
        }
        return (503 if blocking else 200), body

    async def health(self) -> tuple[int, dict[str, Any]]:
        """The detailed view: 503 when Redis does not answer, else 200 (``ok`` or ``degraded``)."""
        found = await self._check()
        reading = found.reading
        blocking = [problem for problem in found.problems if problem in BLOCKING[self.role]]
        status = "unavailable" if reading is None else "degraded" if found.problems else "ok"
        outbox = None
        if reading is not None:
            depth = reading.depth
            outbox = depth.model_dump() | {
                "outstanding": depth.outstanding,
                "oldest_age_seconds": round(reading.oldest_age, 3),
            }
        body = {
            "status": status,
            "role": self.role,
            "ready": not blocking,
            "redis": "unavailable" if reading is None else "ok",
            "worker": found.worker,
            "stripe_key": "missing" if self._key_missing else "ok",
            "outbox": outbox,
            **found.durability,
            "problems": found.problems,
            "blocking": blocking,
            "warnings": found.warnings,
        }
        return (503 if reading is None else 200), body

    async def _check(self) -> _Findings:
        stopping = self._watched.stopping
        if self._prepare is not None and not stopping:
            await self._prepare()
        found = _Findings(worker=self._worker_state(stopping))
        if stopping:
            found.problems.append("stopping")  # which is also why the worker stopped
        elif found.worker in _WORKER_PROBLEMS:
            found.problems.append(_WORKER_PROBLEMS[found.worker])
        if self._key_missing:
            found.problems.append("stripe_key_missing")
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                found.reading = await self._sampler.read()
        except (StoreUnavailableError, RedisError, OSError, TimeoutError):
            found.problems.append("redis_unavailable")
        if found.reading is not None and found.reading.oldest_age > STUCK_SECONDS:
            found.problems.append("outbox_stuck")
        if self._spool is not None and self._spool.full():
            found.problems.append("spool_full")
        guard = self._watched.durability
        if guard is not None:
            found.durability = guard.health()
            found.problems += guard.problems()
            found.warnings += guard.warnings()
        return found

    def _worker_state(self, stopping: bool) -> str:
        """``running``, ``failing``, ``starting`` (a worker process before its worker started),
        ``stopped`` (expected, or started, and not running) or ``off``."""
        worker = self._watched.worker
        if worker is not None and worker.running:
            return _WORKER_STATES[worker.state]
        if self.role == "worker" and worker is None and not stopping:
            return "starting"
        return "stopped" if self._worker_expected or worker is not None else "off"
