"""The counters: dualwrite's metric registry, the metric definitions, and the hooks the low layers
call (the engine, the outbox worker, the rate limits, the stage resolver, the durability checks,
the guard, the proxy).

A leaf, as stamina's instrumentation hooks are: it imports nothing of dualwrite's but its models,
so any layer can count without importing what sits above it. What a hook is handed is typed by a
small ``Protocol`` (``ShadowWrite``, ``CacheStatsSource``), not by the class that hands it. The
``/metrics`` endpoint that reads ``REGISTRY`` is ``dualwrite.metrics``, above the engine; what each
metric means is listed there.
"""

from __future__ import annotations

import platform
import time
import weakref
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from itertools import product
from typing import Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from dualwrite.models import Leg, Stage, WriteResult

__all__ = [
    "REGISTRY",
    "CacheStats",
    "CacheStatsSource",
    "ShadowWrite",
    "count_authoritative",
    "count_dead",
    "count_guard_rollback",
    "count_late_refusal",
    "count_rate_limit",
    "count_redis_data_loss",
    "count_request",
    "count_shadow",
    "count_translation",
    "count_unmapped",
    "set_redis_data_lost",
    "set_redis_persistence",
    "track_resolver",
]


#: dualwrite's registry (``dualwrite.metrics`` says why not the global one).
REGISTRY = CollectorRegistry(auto_describe=True)

_RESULTS = ("accepted", "refused", "failed")
_LIMITS = ("legacy", "meter", "stream", "reads", "meter_turn")
_DEAD_REASONS = ("refused", "expired", "retired")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)

_writes = Counter(
    "dualwrite_writes",
    "Stripe writes by leg (path), the customer's stage, role and result.",
    ["path", "stage", "role", "result"],
    registry=REGISTRY,
)
_write_seconds = Histogram(
    "dualwrite_authoritative_write_seconds",
    "Time of the authoritative write, in-request retries included.",
    ["path"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
_shadow_lag = Histogram(
    "dualwrite_shadow_lag_seconds",
    "Time from a shadow write's enqueue to Stripe's answer that settles it.",
    ["path"],
    buckets=_LAG_BUCKETS,
    registry=REGISTRY,
)
_divergences = Counter(
    "dualwrite_divergences",
    "Events whose legs disagree, by kind, as logged by this process.",
    ["kind"],
    registry=REGISTRY,
)
_dead = Counter(
    "dualwrite_dead_letters",
    "Shadow writes dead-lettered by this process, by leg and reason.",
    ["path", "reason"],
    registry=REGISTRY,
)
_waits = Counter(
    "dualwrite_rate_limit_waits",
    "Writes that waited for a shared Stripe rate limit (or meter turn).",
    ["limit"],
    registry=REGISTRY,
)
_wait_seconds = Histogram(
    "dualwrite_rate_limit_wait_seconds",
    "How long writes waited for a shared Stripe rate limit (or meter turn).",
    ["limit"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
_held_back = Counter(
    "dualwrite_rate_limit_held_back",
    "Writes refused locally because their turn did not come within the allowed wait.",
    ["limit"],
    registry=REGISTRY,
)

_redis_persistence = Gauge(
    "dualwrite_redis_persistence",
    "Redis persistence as this process last read it (CONFIG GET): 2 append-only file, 1 RDB "
    "snapshots only, 0 none (a restart loses everything), -1 unknown (CONFIG not readable).",
    registry=REGISTRY,
)
_redis_persistence.set(-1)
_redis_data_lost = Gauge(
    "dualwrite_redis_data_lost",
    "1 while Redis's data-loss marker says data was lost (the ledger is incomplete until "
    "`dualwrite reconcile`, then `dualwrite durability --clear-loss`).",
    registry=REGISTRY,
)
_redis_data_losses = Counter(
    "dualwrite_redis_data_losses",
    "Redis data losses this process detected: a marker gone, replaced or rolled back.",
    registry=REGISTRY,
)
_guard_rollbacks = Counter(
    "dualwrite_guard_rollbacks",
    "Rollbacks the guard made: one customer back a stage (scope customer), or the whole "
    "rollout (scope global).",
    ["scope"],
    registry=REGISTRY,
)
_requests = Counter(
    "dualwrite_proxy_requests",
    "Requests the proxy answered, by route class (usage_record, stripe: forwarded, webhook, "
    "admin, report, health, metrics) and HTTP status.",
    ["route", "status"],
    registry=REGISTRY,
)
_request_seconds = Histogram(
    "dualwrite_proxy_request_seconds",
    "Time the proxy took to answer, by route class.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
_unmapped = Counter(
    "dualwrite_unmapped_usage",
    "Usage records the proxy forwarded to the legacy path only: their item maps to no meter, "
    "it could not be read, or the request was a Connect one.",
    registry=REGISTRY,
)
_build_info = Gauge(
    "dualwrite_build_info",
    "Always 1; the labels say which dualwrite and Python this process runs.",
    ["version", "python"],
    registry=REGISTRY,
)


def _version() -> str:
    try:
        return version("dualwrite")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


_build_info.labels(_version(), platform.python_version()).set(1)

# Every labelled child is bound once, here: a hook is a dict lookup and an increment.
_WRITES = {
    (leg, stage, role, result): _writes.labels(leg.value, stage.value, role, result)
    for leg, stage, role, result in product(Leg, Stage, ("authoritative", "shadow"), _RESULTS)
}
_WRITE_SECONDS = {leg: _write_seconds.labels(leg.value) for leg in Leg}
_SHADOW_LAG = {leg: _shadow_lag.labels(leg.value) for leg in Leg}
_TRANSLATED = _divergences.labels("translated")
_LATE_REFUSED = _divergences.labels("late_refusal")
_DIVERGENCE_OF_DEAD = {
    "refused": _divergences.labels("shadow_refused"),
    "expired": _divergences.labels("shadow_expired"),
}
_DEAD = {(leg, reason): _dead.labels(leg.value, reason) for leg in Leg for reason in _DEAD_REASONS}
_WAITS = {limit: _waits.labels(limit) for limit in _LIMITS}
_WAIT_SECONDS = {limit: _wait_seconds.labels(limit) for limit in _LIMITS}
_HELD_BACK = {limit: _held_back.labels(limit) for limit in _LIMITS}

for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    # The same collectors as the global registry's: CPU, memory, file descriptors, GC.
    REGISTRY.register(_collector)


class ShadowWrite(Protocol):
    """What ``count_shadow`` reads of a shadow write (an outbox entry)."""

    @property
    def leg(self) -> Leg:
        """The leg written."""

    @property
    def stage(self) -> Stage:
        """The customer's stage when the event was planned."""

    @property
    def enqueued_at(self) -> float:
        """When the write was enqueued (epoch seconds)."""


class CacheStats(Protocol):
    """A stage cache's counters, as ``track_resolver`` reads them."""

    @property
    def hits(self) -> int:
        """Resolutions answered from the local cache."""

    @property
    def misses(self) -> int:
        """Lookups that went to Redis."""

    @property
    def safe_fallbacks(self) -> int:
        """Resolutions answered with the safe stage."""

    @property
    def invalidations(self) -> int:
        """Cache invalidations."""


class CacheStatsSource(Protocol):
    """Something with stage cache counters (a ``StageResolver``)."""

    @property
    def stats(self) -> CacheStats:
        """The counters now."""


def _result(result: WriteResult) -> str:
    if result.accepted:
        return "accepted"
    failure = result.failure
    return "failed" if failure is not None and failure.retryable else "refused"


# -- hooks ---------------------------------------------------------------------------------------


def count_authoritative(result: WriteResult, stage: Stage, started: float) -> None:
    """Count an authoritative write and its duration since ``started`` (``time.perf_counter``)."""
    _WRITES[result.leg, stage, "authoritative", _result(result)].inc()
    _WRITE_SECONDS[result.leg].observe(time.perf_counter() - started)


def count_shadow(entry: ShadowWrite, result: WriteResult, now: float) -> None:
    """Count a shadow write's answer, and its lag from enqueue (``now``: the worker's clock)."""
    _WRITES[entry.leg, entry.stage, "shadow", _result(result)].inc()
    if result.accepted:
        _SHADOW_LAG[entry.leg].observe(max(0.0, now - entry.enqueued_at))


def count_dead(leg: Leg, reason: str) -> None:
    """Count a dead-lettered shadow write (and its divergence, unless the leg was retired)."""
    child = _DEAD.get((leg, reason))
    if child is not None:
        child.inc()
    divergence = _DIVERGENCE_OF_DEAD.get(reason)
    if divergence is not None:
        divergence.inc()


def count_translation() -> None:
    """Count a legacy ``set`` translated for a meter (logged as divergence)."""
    _TRANSLATED.inc()


def count_late_refusal() -> None:
    """Count a meter event Stripe refused after accepting it (logged as divergence)."""
    _LATE_REFUSED.inc()


def count_rate_limit(limit: str, waited: float, held_back: bool) -> None:
    """Count a wait of ``waited`` seconds for ``limit``, or a write held back."""
    if held_back:
        child = _HELD_BACK.get(limit)
        if child is not None:
            child.inc()
        return
    waits, seconds = _WAITS.get(limit), _WAIT_SECONDS.get(limit)
    if waits is not None and seconds is not None:
        waits.inc()
        seconds.observe(waited)


def set_redis_persistence(level: int) -> None:
    """Record Redis's persistence: 2 append-only file, 1 RDB only, 0 none, -1 unknown."""
    _redis_persistence.set(level)


def set_redis_data_lost(lost: bool) -> None:
    """Record whether the data-loss marker says Redis lost data."""
    _redis_data_lost.set(1 if lost else 0)


def count_redis_data_loss() -> None:
    """Count a Redis data loss this process detected."""
    _redis_data_losses.inc()


_GUARD_ROLLBACKS = {scope: _guard_rollbacks.labels(scope) for scope in ("customer", "global")}


def count_guard_rollback(scope: str) -> None:
    """Count a rollback the guard made (``customer`` or ``global``)."""
    child = _GUARD_ROLLBACKS.get(scope)
    if child is not None:
        child.inc()


def count_request(route: str, status: int, seconds: float) -> None:
    """Count one request the proxy answered, and how long it took."""
    _requests.labels(route, str(status)).inc()
    _request_seconds.labels(route).observe(seconds)


def count_unmapped() -> None:
    """Count a usage record forwarded to the legacy path only (no meter for it)."""
    _unmapped.inc()


# -- resolvers (read at scrape time) -------------------------------------------------------------

_resolvers: weakref.WeakSet[CacheStatsSource] = weakref.WeakSet()
_CACHE_FIELDS = (
    ("hits", "Stage resolutions answered from the local cache."),
    ("misses", "Stage lookups that went to Redis (failed ones included)."),
    ("safe_fallbacks", "Stage resolutions answered with the safe stage (Redis failed)."),
    ("invalidations", "Stage cache invalidations (flag changes, reconnects)."),
)
# What resolvers no longer alive counted, and the last totals reported: a counter never goes down.
_retired: dict[str, int] = {name: 0 for name, _ in _CACHE_FIELDS}
_reported: dict[str, int] = {name: 0 for name, _ in _CACHE_FIELDS}


def track_resolver(resolver: CacheStatsSource) -> None:
    """Report ``resolver``'s cache counters while it lives (its ``stats``, read at scrape time)."""
    _resolvers.add(resolver)


def untrack_resolver(resolver: CacheStatsSource) -> None:
    """Keep what ``resolver`` counted in the totals once it is gone (called as it is collected)."""
    stats = resolver.stats
    # Out of the live set first: a scrape between the two lines reads a total too low, which
    # ``_ResolverCollector`` holds at the last one reported, never one counted twice.
    _resolvers.discard(resolver)
    for name, _ in _CACHE_FIELDS:
        _retired[name] += getattr(stats, name)


class _ResolverCollector(Collector):
    """The stage cache counters: the process's live resolvers' plus those of resolvers gone."""

    def collect(self) -> Iterable[Metric]:
        stats = [resolver.stats for resolver in list(_resolvers)]
        for name, documentation in _CACHE_FIELDS:
            total = _retired[name] + sum(getattr(item, name) for item in stats)
            _reported[name] = max(_reported[name], total)
            family = CounterMetricFamily(f"dualwrite_stage_cache_{name}", documentation)
            family.add_metric([], _reported[name])
            yield family


REGISTRY.register(_ResolverCollector())
