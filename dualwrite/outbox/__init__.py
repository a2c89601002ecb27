"""The outbox: shadow writes in a Redis Stream, and the workers that deliver them to Stripe.

Delivery is at-least-once; the effect is exactly-once because

* every write to Stripe carries the event's deterministic per-leg idempotency key (and, for meter
  events, a deterministic ``identifier``), so Stripe applies a re-sent write once; and
* every state change a worker makes after a write (acknowledge, update the ledger, log a divergence,
  dead-letter, reschedule) is one Lua script that first acknowledges the entry and does nothing else
  unless that acknowledgement removed it from the pending list. A slow worker whose entry was claimed
  by another therefore cannot count it a second time.

Retryable failures leave the stream for a sorted set scored by their due time (exponential backoff
with jitter, at least ``Retry-After``) and come back when due. Permanent failures, and entries older
than ``max_age_seconds``, go to the dead-letter stream and the divergence log; retired writes
(legacy writes Stripe refused because the item moved to its meter-backed price) go to a retired
stream of their own, as they are not failures. Entries left pending by a dead worker are claimed by
the living after ``claim_idle_seconds``.
"""

from __future__ import annotations

from dualwrite.outbox._delivery import Disposition, OutboxWorker
from dualwrite.outbox._store import (
    DEAD_MAXLEN,
    OUTBOX_GROUP,
    RETIRED,
    Outbox,
    OutboxDepth,
    OutboxEntry,
)

__all__ = [
    "DEAD_MAXLEN",
    "OUTBOX_GROUP",
    "RETIRED",
    "Disposition",
    "Outbox",
    "OutboxDepth",
    "OutboxEntry",
    "OutboxWorker",
]
