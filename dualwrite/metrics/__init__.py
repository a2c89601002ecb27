"""Prometheus metrics: what dualwrite counts, and ``/metrics`` to read them.

All metrics live in ``REGISTRY``, a ``CollectorRegistry`` of dualwrite's own (not
``prometheus_client``'s global one, so that they never collide with an app's own metrics), and
count for the whole process: every engine, worker and resolver in it adds to the same series.

Counted where it happens (hooks in the engine, the outbox worker and the rate limits; each is one
call on a pre-bound labelled child):

* ``dualwrite_writes_total{path,stage,role,result}``: Stripe writes by leg (``legacy``/``meter``),
  the customer's stage, ``authoritative`` or ``shadow``, and ``accepted``, ``refused`` or
  ``failed`` (retryable: network, 409, 429, 5xx);
* ``dualwrite_authoritative_write_seconds{path}``: how long the authoritative write took
  (in-request retries included); ``dualwrite_shadow_lag_seconds{path}``: from enqueue to settled;
* ``dualwrite_divergences_total{kind}`` (``translated``, ``shadow_refused``, ``shadow_expired``,
  ``late_refusal``) and ``dualwrite_dead_letters_total{path,reason}``;
* ``dualwrite_rate_limit_waits_total{limit}``, ``dualwrite_rate_limit_wait_seconds{limit}`` and
  ``dualwrite_rate_limit_held_back_total{limit}``;
* ``dualwrite_redis_persistence`` (2 append-only file, 1 RDB only, 0 none, -1 unknown) and
  ``dualwrite_redis_data_lost`` (1 while the data-loss marker says so), set by
  ``dualwrite.durability``, and ``dualwrite_redis_data_losses_total``, the losses it detected;
* ``dualwrite_guard_rollbacks_total{scope}``: the guard's rollbacks (``customer``, ``global``);
* ``dualwrite_proxy_requests_total{route,status}`` and ``dualwrite_proxy_request_seconds{route}``:
  what the proxy answered (``RequestObserver``, which also writes the access log), and
  ``dualwrite_unmapped_usage_total``: usage records it forwarded to the legacy path only;
* ``dualwrite_build_info{version,python}``: always 1.

Read at scrape time, costing the request path nothing:

* ``dualwrite_stage_cache_{hits,misses,safe_fallbacks,invalidations}_total``: summed over the
  process's live ``StageResolver``s (their own counters);
* ``dualwrite_outbox_entries{state}``, ``dualwrite_outbox_oldest_age_seconds``,
  ``dualwrite_divergence_log_entries`` and ``dualwrite_redis_up``: read from Redis (async, bounded
  by ``SAMPLE_TIMEOUT``) by the ``/metrics`` endpoint just before it answers.

``MetricsApp`` is the endpoint: ``dualwrite serve`` answers ``/metrics`` with it, ``dualwrite worker
--metrics-port`` serves it, and any ASGI app can mount it (``metrics_app(settings)``). With
``DUALWRITE_METRICS_TOKEN`` set it asks for ``Authorization: Bearer <token>``.

The registry, the definitions and the hooks are ``dualwrite.instruments``, a leaf the low layers
import (re-exported here); this package sits above the engine. Modules: ``_endpoint`` (the app, the
sampler, the worker's server), ``_requests`` (``RequestObserver``: request metrics and the access
log).
"""

from __future__ import annotations

from dualwrite.instruments import (
    REGISTRY,
    count_authoritative,
    count_dead,
    count_guard_rollback,
    count_late_refusal,
    count_rate_limit,
    count_redis_data_loss,
    count_request,
    count_shadow,
    count_translation,
    count_unmapped,
    set_redis_data_lost,
    set_redis_persistence,
    track_resolver,
)
from dualwrite.metrics._endpoint import (
    SAMPLE_TIMEOUT,
    MetricsApp,
    OutboxReading,
    OutboxSampler,
    metrics_app,
    serve_metrics,
)
from dualwrite.metrics._requests import RequestObserver, path_template

__all__ = [
    "REGISTRY",
    "SAMPLE_TIMEOUT",
    "MetricsApp",
    "OutboxReading",
    "OutboxSampler",
    "RequestObserver",
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
    "metrics_app",
    "path_template",
    "serve_metrics",
    "set_redis_data_lost",
    "set_redis_persistence",
    "track_resolver",
]
