"""Recording one claimed event: its authoritative write, then what is persisted once it answered.

``ClaimDriver.drive`` takes an event ``record()`` (or a recovery) has claimed, writes its authoritative
leg under the keys of its plan (a ``set`` waits for its turn at its item and timestamp), then:

* an accepted write becomes one ``Commit`` (ledger update, shadow outbox entry, translation log of a
  ``set``, the claim resolved: its outcome kept for a caller's retry, or dropped when minted),
  applied in one Redis transaction, or spooled when Redis is down so the shadow is delayed, not
  lost;
* a refused write releases its claim (kept due for recovery when no answer came: it may have been
  written) and is counted in the ledger;
* a full spool holds usage back with a retryable 503.

Redis being down after Stripe accepted the write never fails the caller's request: it is logged.
A ``set`` that does not get its turn in time is refused (``ConflictError``), nothing written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from dualwrite import _remembered as remembered, instruments
from dualwrite.config import Settings
from dualwrite.exceptions import ConflictError, StoreUnavailableError
from dualwrite.idempotency import (
    SET_VALUE_TTL_SECONDS,
    Claim,
    IdempotencyStore,
    SetOrder,
    claim_member,
)
from dualwrite.keys import ShardKeys
from dualwrite.late_refusals import LateRefusals
from dualwrite.ledger import (
    Commit,
    CommitWriter,
    LedgerUpdate,
    LegView,
    divergence_fields,
    failure_code,
)
from dualwrite.models import (
    EventPlan,
    Leg,
    RecordOutcome,
    ShadowStatus,
    Stage,
    StagePlan,
    StripeFailure,
    UsageEvent,
    WriteResult,
)
from dualwrite.outbox import OutboxEntry
from dualwrite.rate_limits import TokenAsk
from dualwrite.redis_client import store_errors
from dualwrite.spool import Spool
from dualwrite.stripe_io import StripeWriter

__all__ = [
    "ClaimDriver",
    "LegacyWrite",
    "apply_commit",
    "build_commit",
    "count_refusal",
    "held_back",
    "refused_before_writing",
]

# The engine's logger: these records come from record() and keep the name operators filter on.
log = logging.getLogger("dualwrite.engine")


def held_back(
    event: UsageEvent, stage: Stage, plan: StagePlan, *, retry_after: float
) -> RecordOutcome:
    """Back-pressure: the spool is full (Redis has been away a long time), so nothing more is
    written until it drains; the caller gets a retryable 503 and retries later."""
    log.error(
        "usage %s refused (retryable): Redis is unavailable and the spool holds "
        "spool_max_bytes already",
        event.identifier,
    )
    failure = StripeFailure(
        http_status=503,
        type="api_error",
        message="Usage cannot be recorded right now; retry later with the same Idempotency-Key.",
        retryable=True,
        retry_after=retry_after,
    )
    return refused_before_writing(event, stage, plan, failure)


def refused_before_writing(
    event: UsageEvent, stage: Stage, plan: StagePlan, failure: StripeFailure
) -> RecordOutcome:
    """The outcome of usage refused before anything was written (the caller gets ``failure``)."""
    result = WriteResult(
        leg=plan.authoritative, accepted=False, http_status=failure.http_status, failure=failure
    )
    return RecordOutcome(
        event=event,
        stage=stage,
        authoritative=result,
        shadow_leg=plan.shadow,
        shadow_status="skipped" if plan.shadow else "not_applicable",
    )


async def count_refusal(
    redis: aioredis.Redis,
    idempotency: IdempotencyStore,
    shard: ShardKeys,
    event: UsageEvent,
    result: WriteResult,
    *,
    claim: Claim,
    now: float,
    period: Callable[[], Awaitable[str]],
) -> None:
    """Release the refused event's claim and count the refusal in its ledger period.

    A write that got no answer at all (a timeout, a dropped connection), or Stripe's 409 (the key
    is in use by an earlier attempt still executing, or a lock), may have been written: its claim
    stays due for recovery, which replays it under the same key. So does any retryable failure
    (a 429, a 5xx, a turn not given in time) of a later attempt: the first one may have written.
    """
    failure = result.failure
    retried = claim.event is not None  # an earlier attempt of this event existed
    in_doubt = (
        failure is not None
        and failure.retryable
        and (retried or failure.http_status in (None, 409))
    )
    try:
        await idempotency.release(shard, event, claim, in_doubt=in_doubt, now=now)
        update = LedgerUpdate(shard, event, await period()).refused(
            result.leg, failure_code(result.failure)
        )
        async with store_errors("counting a refusal"):
            pipe = redis.pipeline(transaction=True)
            update.queue(pipe)
            await pipe.execute()
    except StoreUnavailableError:
        log.warning("Redis unavailable: refusal of %s not counted", event.identifier)


def build_commit(
    shard: ShardKeys,
    outcome: RecordOutcome,
    plan: EventPlan,
    effective: int,
    period: str,
    *,
    claim: Claim,
    now: float,
    idempotency_ttl: int,
) -> Commit:
    """The ledger update, shadow entry, translation log and claim resolution, as one value."""
    event = outcome.event
    update = LedgerUpdate(shard, event, period).recorded(
        plan.stage, plan.authoritative, plan.shadow, effective, translated=outcome.translated
    )
    entry = None
    if plan.shadow is not None:
        entry = OutboxEntry(
            event=event,
            leg=plan.shadow,
            value=effective,
            stage=plan.stage,
            authoritative_id=outcome.authoritative.stripe_id,
            enqueued_at=now,
            period=period,
            set_seq=claim.set_seq,
        )
    tracked = event.identifier_source != "minted"
    claimed = claim.held
    is_set = event.action == "set" and event.subscription_item is not None
    return Commit.of_update(
        update,
        outbox_payload=entry.payload() if entry else None,
        divergence=_translation(outcome, effective, now) if outcome.translated else None,
        idempotency_key=shard.idempotency(event.identifier) if tracked or claimed else None,
        outcome_json=remembered.encode(outcome) if tracked else None,
        idempotency_ttl=idempotency_ttl,
        set_key=shard.set_value(event.subscription_item or "", event.timestamp) if is_set else None,
        set_value=event.quantity if is_set and not claimed else None,
        set_ttl=SET_VALUE_TTL_SECONDS,
        claimed=claimed,
        claim_member=claim_member(event) if claimed else None,
        drop_claim=claimed and not tracked,
        set_seq=claim.set_seq if claimed else None,
    )


async def apply_commit(
    commit: Commit,
    outcome: RecordOutcome,
    period: str,
    *,
    commits: CommitWriter,
    late: LateRefusals,
    spool: Spool | None,
) -> RecordOutcome:
    """Apply the commit; if Redis is down, spool it (fsynced) so the shadow is delayed, not lost."""
    try:
        await commits.apply(commit)
    except StoreUnavailableError:
        pass
    else:
        if outcome.authoritative.leg is Leg.METER:
            value = outcome.authoritative.value or outcome.event.quantity
            await late.remember(outcome.event, value=value, stage=outcome.stage, period=period)
        return outcome
    event = outcome.event
    if spool is None:
        log.error(
            "usage %s was accepted on the %s leg but Redis is unavailable and no spool is "
            "configured: ledger not updated%s",
            event.identifier,
            outcome.authoritative.leg.value,
            " and the shadow write is lost" if outcome.shadow_leg else "",
        )
        return outcome.model_copy(
            update={"shadow_status": "enqueue_failed"} if outcome.shadow_leg else {}
        )
    try:
        await spool.append(commit)
    except OSError:
        log.exception("usage %s: Redis is down and the spool cannot be written", event.identifier)
        return outcome.model_copy(
            update={"shadow_status": "enqueue_failed"} if outcome.shadow_leg else {}
        )
    log.warning("Redis unavailable: usage %s spooled locally until it returns", event.identifier)
    return outcome.model_copy(update={"shadow_status": "spooled"} if outcome.shadow_leg else {})


def _translation(outcome: RecordOutcome, effective: int, now: float) -> dict[str, str]:
    """The divergence-log fields recording how a ``set`` was translated into a meter delta."""
    instruments.count_translation()
    auth = LegView.of(outcome.authoritative)
    pending = LegView(status="pending") if outcome.shadow_leg else LegView(status="not_written")
    legacy, meter = (auth, pending) if outcome.authoritative.leg is Leg.LEGACY else (pending, auth)
    return divergence_fields(
        outcome.event,
        kind="translated",
        stage=outcome.stage,
        legacy=legacy,
        meter=meter,
        note=f"set {outcome.event.quantity} sent to the meter as {effective:+d}",
        at=now,
    )


LegacyWrite = Callable[[UsageEvent], Awaitable[WriteResult]]
"""Makes the authoritative legacy write for ``record()`` (the proxy: forward the caller's request)."""

PeriodOf = Callable[[UsageEvent, str | None], Awaitable[str]]
"""The ledger period of an event (written with an API key, or None for the configured one)."""


class ClaimDriver:
    """Drives one claimed event to its end: the authoritative write (a ``set`` in its turn),
    then the commit with its shadow, or the release of its claim. ``record()`` drives the events
    it intercepts, ``dualwrite.recovery`` the ones their first holder left unfinished."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis: aioredis.Redis,
        writer: StripeWriter,
        idempotency: IdempotencyStore,
        set_order: SetOrder,
        commits: CommitWriter,
        late: LateRefusals,
        spool: Spool | None,
        period: PeriodOf,
        clock: Callable[[], float],
    ):
        self._settings = settings
        self._redis = redis
        self._writer = writer
        self._idempotency = idempotency
        self._set_order = set_order
        self._commits = commits
        self._late = late
        self._spool = spool
        self._period = period
        self._clock = clock

    async def drive(
        self,
        shard: ShardKeys,
        event: UsageEvent,
        plan: EventPlan,
        claim: Claim,
        *,
        api_key: str | None,
        legacy_write: LegacyWrite | None = None,
        prepaid: TokenAsk | None = None,
    ) -> RecordOutcome:
        """The authoritative write of a claimed event, then its commit (or its release).

        ``prepaid``: the legacy rate's unit granted with the claim, spent by the first attempt of
        the legacy write (given back if no write is made)."""
        effective = event.quantity - claim.set_previous if event.action == "set" else event.quantity
        translated = event.action == "set" and Leg.METER in (plan.authoritative, plan.shadow)
        started = time.perf_counter()
        if not await self._set_turn(shard, event, plan, claim):
            if prepaid is not None and self._writer.limits is not None:
                await self._writer.limits.refund(prepaid)
            # Nothing was written now; an earlier attempt (a retry's, a recovery's) may have been.
            with contextlib.suppress(StoreUnavailableError):
                await self._idempotency.release(
                    shard, event, claim, in_doubt=claim.event is not None, now=self._clock()
                )
            msg = f"another set on {event.subscription_item} at {event.timestamp} is being written"
            raise ConflictError(msg)
        if legacy_write is not None and plan.authoritative is Leg.LEGACY:
            result = await legacy_write(event)
        else:
            result = await self._write_authoritative(
                plan, event, effective, api_key, prepaid=prepaid is not None
            )
        instruments.count_authoritative(result, plan.stage, started)
        shadow_status: ShadowStatus = "enqueued" if plan.shadow else "not_applicable"
        if not result.accepted:
            shadow_status = "skipped" if plan.shadow else "not_applicable"
        outcome = RecordOutcome(
            event=event,
            stage=plan.stage,
            authoritative=result,
            shadow_leg=plan.shadow,
            shadow_status=shadow_status,
            translated=translated,
        )
        if not result.accepted:
            await count_refusal(
                self._redis,
                self._idempotency,
                shard,
                event,
                result,
                claim=claim,
                now=self._clock(),
                period=lambda: self._period(event, api_key),
            )
            return outcome
        period = await self._period(event, api_key)
        commit = build_commit(
            shard,
            outcome,
            plan,
            effective,
            period,
            claim=claim,
            now=self._clock(),
            idempotency_ttl=self._idempotency.ttl_seconds,
        )
        return await apply_commit(
            commit, outcome, period, commits=self._commits, late=self._late, spool=self._spool
        )

    async def _set_turn(
        self, shard: ShardKeys, event: UsageEvent, plan: EventPlan, claim: Claim
    ) -> bool:
        """A ``set`` written to the legacy leg now waits for any other legacy write of a set at
        its item and timestamp (a shadow still in flight): Stripe keeps the last one to arrive.
        The turn is given back by the commit (or the release). False: it did not come in time."""
        if event.action != "set" or claim.set_seq is None or plan.authoritative is not Leg.LEGACY:
            return True
        token = shard.idempotency(event.identifier)
        deadline = time.monotonic() + self._settings.limits.request_max_wait
        try:
            while await self._set_order.begin(shard, event, claim.set_seq, token) == "busy":
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.02)
        except StoreUnavailableError:
            log.warning("Redis unavailable: set %s written without its turn", event.identifier)
        return True

    async def _write_authoritative(
        self,
        plan: EventPlan,
        event: UsageEvent,
        value: int,
        api_key: str | None,
        *,
        prepaid: bool = False,
    ) -> WriteResult:
        """Write the authoritative leg, retrying retryable failures a few times within the request.

        Every attempt carries the same idempotency key, so an attempt that reached Stripe but whose
        answer was lost (a timeout) is replayed by Stripe rather than counted again. ``prepaid``:
        the first attempt's legacy rate unit was granted with the claim (later attempts take
        their own).
        """
        retries, wait = (
            self._settings.stripe.request_retries,
            self._settings.stripe.request_retry_wait,
        )
        leg = plan.authoritative
        for attempt in range(retries + 1):
            result = await self._writer.write(
                leg, event, value=value, api_key=api_key, plan=plan, prepaid=prepaid and not attempt
            )
            failure = result.failure
            if result.accepted or failure is None or not failure.retryable or attempt == retries:
                return result
            delay = wait * 2**attempt
            if failure.retry_after is not None and failure.retry_after > 4 * delay:
                return result  # Stripe asks for a longer pause than a request should hold
            await asyncio.sleep(max(delay, failure.retry_after or 0.0))
        return result
