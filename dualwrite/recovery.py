"""Recovery: events whose claim was never committed are finished by the workers, without a caller.

An event is claimed before its authoritative write (``dualwrite.idempotency``). If the process
that held it died before the commit (the authoritative write may already be in Stripe, its shadow
in nobody's hands), or its authoritative write got no answer, the claim falls due: the workers
take it over and re-drive it with the plan and the event of its first intercept. The authoritative
write is replayed under the same Stripe idempotency key, so Stripe answers with the original
result when the first attempt had reached it (and writes it now when it had not), and the event
is committed with its shadow. A caller's later retry with the same identifier then gets the
recovered outcome. Until then the report counts the event as pending.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from dualwrite.exceptions import DualwriteError, StoreUnavailableError
from dualwrite.idempotency import Claim, IdempotencyStore
from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.models import RecordOutcome

__all__ = ["Redrive", "recover_due"]

log = logging.getLogger(__name__)

Redrive = Callable[[ShardKeys, Claim], Awaitable[RecordOutcome | None]]
"""Finishes one claim taken over for recovery (``DualWriteEngine.redrive``)."""


async def recover_due(
    store: IdempotencyStore, keys: KeySpace, redrive: Redrive, *, now: float, limit: int
) -> int:
    """Take over and re-drive up to ``limit`` claims per shard that are due at ``now``; returns
    how many were re-driven. A failure leaves the claim due again a lease later.

    Raises:
        StoreUnavailableError: Redis could not be reached.
    """
    recovered = 0
    for shard in keys.all_shards():
        for member in await store.due(shard, now=now, limit=limit):
            claim = await store.take(shard, member, now=now)
            if claim is None or claim.event is None:
                continue
            event = claim.event
            try:
                outcome = await redrive(shard, claim)
            except StoreUnavailableError:
                raise
            except DualwriteError as exc:  # the event cannot be written (its item vanished...)
                log.error("recovery of usage %s stopped: %s", event.identifier, exc)
                continue
            recovered += 1
            if outcome is not None and outcome.accepted:
                log.warning(
                    "usage %s of %s recovered: committed after its first attempt was left "
                    "unfinished (its holder died or Stripe did not answer)",
                    event.identifier,
                    event.customer,
                )
            elif outcome is not None:
                log.warning(
                    "usage %s of %s recovered: Stripe refused it (%s)",
                    event.identifier,
                    event.customer,
                    outcome.authoritative.failure.message
                    if outcome.authoritative.failure
                    else "no reason given",
                )
    return recovered
