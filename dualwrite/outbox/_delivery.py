"""``OutboxWorker``: delivers outbox entries to Stripe and settles them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, Protocol

from dualwrite import instruments
from dualwrite.exceptions import StoreUnavailableError
from dualwrite.keys import ShardKeys
from dualwrite.ledger import (
    LedgerUpdate,
    LegView,
    describe_failure,
    divergence_fields,
    failure_code,
)
from dualwrite.models import Leg, Stage, UsageEvent, WriteResult
from dualwrite.outbox._store import RETIRED, Outbox, OutboxEntry
from dualwrite.rate_limits import MeterTurn
from dualwrite.stripe_io import MAX_STREAM_BATCH, RETIRED_LEGACY_MARKER, StripeWriter

__all__ = ["Disposition", "MeterAccepted", "OutboxWorker", "WorkerState"]

log = logging.getLogger("dualwrite.outbox._worker")  # its name before the module was renamed


Disposition = Literal["accepted", "retry", "dead", "skipped"]
WorkerState = Literal["healthy", "failing"]
"""``failing`` from a failed round until the next good one."""

#: While failing, the worker says so again at most this often (seconds).
FAILING_REMINDER_SECONDS = 60.0

# Due retries are promoted at most this often (seconds) while the worker is busy: a backoff is
# seconds long, and a Lua call on every shard per read cost v1 delivery a round trip per event.
_PROMOTE_EVERY = 0.1


class SetTurns(Protocol):
    """Orders the legacy writes of ``set`` usage (``dualwrite.idempotency.SetOrder``)."""

    async def begin(
        self, shard: ShardKeys, event: UsageEvent, seq: int, token: str
    ) -> Literal["go", "superseded", "busy"]:
        """Whether the set at position ``seq`` may be written now (taking the turn)."""

    async def end(self, shard: ShardKeys, event: UsageEvent, token: str) -> None:
        """Give the turn back."""


class MeterAccepted(Protocol):
    """Called after a meter write is settled as accepted (late-refusal tracking)."""

    async def __call__(
        self, event: UsageEvent, *, value: int, stage: Stage, period: str | None
    ) -> None:
        """Note the accepted meter event."""


class OutboxWorker:
    """Delivers outbox entries to Stripe: one instance per process (inside the ASGI lifespan, or a
    ``dualwrite worker``), any number sharing one Redis."""

    def __init__(
        self,
        outbox: Outbox,
        writer: StripeWriter,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_wait: float = 30.0,
        on_meter_accepted: MeterAccepted | None = None,
        recover: Callable[[], Awaitable[int]] | None = None,
        set_turns: SetTurns | None = None,
    ):
        self.outbox = outbox
        self.max_wait = max_wait
        self._on_meter_accepted = on_meter_accepted
        self._recover = recover
        self._set_turns = set_turns
        self._last_recover = 0.0
        self._recovering = False
        self.writer = writer
        self.settings = outbox.settings
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._clock = clock
        self._rng = rng or random.Random()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_claim = 0.0
        self._last_promote = -_PROMOTE_EVERY
        self._inflight: set[asyncio.Task[None]] = set()
        self._backlog = False  # the last read was full: more entries are probably waiting
        self.counts: dict[Disposition, int] = {"accepted": 0, "retry": 0, "dead": 0, "skipped": 0}
        self.state: WorkerState = "healthy"
        self.failing_since: float | None = None
        """When the current run of failed rounds began (``time.monotonic``)."""
        self._failed_rounds = 0
        self._last_reminder = 0.0

    @property
    def running(self) -> bool:
        """Whether the delivery loop is running (started, and neither stopped nor crashed)."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Run the delivery loop in a background task.

        Redis being down is not fatal: the loop creates the consumer groups once it answers.
        """
        with contextlib.suppress(StoreUnavailableError):
            await self.outbox.ensure_groups()
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"dualwrite-outbox-{self.consumer}")

    async def aclose(self, *, grace: float = 10.0) -> None:
        """Stop taking entries and let the deliveries in flight finish (waiting up to ``grace``
        seconds); what is left unsettled stays pending, and another worker claims it."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                backlog = False
                try:
                    await self._fill(block_ms=None if self._inflight else self.settings.block_ms)
                    backlog, self._backlog = self._backlog, False
                    self._round_succeeded()
                except Exception as exc:  # logged on each change of state, not every round
                    self._round_failed(exc)
                if backlog and len(self._inflight) < self.settings.concurrency:
                    # A full read (a v2 read is capped by batch_size) leaves entries waiting and
                    # slots free: read again now rather than after the next delivery finishes.
                    continue
                if self._inflight:
                    # Read more as soon as any delivery frees a slot: a slow call to Stripe never
                    # holds up the others.
                    await asyncio.wait(self._inflight, timeout=0.05, return_when=FIRST_COMPLETED)
                elif self._failed_rounds:
                    delay = min(5.0, 0.05 * 2 ** min(self._failed_rounds, 10))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)

    def _round_failed(self, exc: Exception) -> None:
        """Log a failed round when the worker starts failing (and a reminder every minute while
        it keeps failing), not every round: an outage must not flood the log."""
        self._failed_rounds += 1
        now = time.monotonic()
        store = isinstance(exc, StoreUnavailableError)
        if self.state == "healthy":
            self.state, self.failing_since, self._last_reminder = "failing", now, now
            if store:
                log.warning("outbox worker %s failing: %s", self.consumer, exc)
            else:
                log.error("outbox worker %s failing", self.consumer, exc_info=exc)
        elif now - self._last_reminder >= FAILING_REMINDER_SECONDS:
            self._last_reminder = now
            log.warning(
                "outbox worker %s still failing after %d round(s) in %.0f s: %s",
                self.consumer,
                self._failed_rounds,
                now - (self.failing_since or now),
                exc if store else repr(exc),
            )

    def _round_succeeded(self) -> None:
        """Log the way back to healthy, once."""
        if self.state == "failing":
            log.warning(
                "outbox worker %s healthy again after %d failed round(s) in %.1f s",
                self.consumer,
                self._failed_rounds,
                time.monotonic() - (self.failing_since or time.monotonic()),
            )
        self.state, self.failing_since, self._failed_rounds = "healthy", None, 0

    async def _fill(self, *, block_ms: int | None, promote: bool = False) -> int:
        """Promote due retries (every ``_PROMOTE_EVERY`` seconds, or now if ``promote``), claim
        stale entries, and start deliveries for free slots."""
        free = self.settings.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        await self.outbox.ensure_groups()
        now = self._clock()
        ticked = time.monotonic()  # not ``clock``: a test clock may stand still
        if promote or ticked - self._last_promote >= _PROMOTE_EVERY:
            self._last_promote = ticked
            await self.outbox.promote_due(now=now)
        self._recover_when_due(now)
        batch: list[tuple[ShardKeys, str, str]] = []
        if now - self._last_claim >= self.settings.claim_idle_seconds / 2:
            self._last_claim = now
            batch += await self.outbox.claim_stale(
                self.consumer,
                min_idle_ms=int(self.settings.claim_idle_seconds * 1000),
                count=min(free, self.settings.batch_size),
            )
        if not batch:
            # On the v2 stream one delivery carries up to 100 entries: read enough to fill them.
            per_slot = MAX_STREAM_BATCH if self.writer.meter_path == "v2" else 1
            count = min(free * per_slot, self.settings.batch_size)
            batch = await self.outbox.read(self.consumer, count=count, block_ms=block_ms)
            self._backlog = len(batch) >= count
        streamed: list[tuple[ShardKeys, str, OutboxEntry]] = []
        for shard, entry_id, payload in batch:
            entry = self._streamable(payload)
            if entry is not None:
                streamed.append((shard, entry_id, entry))
            else:
                self._spawn(self._deliver_logged(shard, entry_id, payload))
        for start in range(0, len(streamed), MAX_STREAM_BATCH):
            self._spawn(self._deliver_stream_logged(streamed[start : start + MAX_STREAM_BATCH]))
        return len(batch)

    def _recover_when_due(self, now: float) -> None:
        """Every ``claim_idle_seconds / 2``, re-drive the events whose claims fell due (their
        holder died before the commit, or Stripe never answered): ``dualwrite.recovery``."""
        if self._recover is None or self._recovering:  # one recovery at a time
            return
        if now - self._last_recover < self.settings.claim_idle_seconds / 2:
            return
        self._last_recover = now
        self._recovering = True
        self._spawn(self._recover_logged(self._recover))

    async def _recover_logged(self, recover: Callable[[], Awaitable[int]]) -> None:
        try:
            await recover()
        except StoreUnavailableError as exc:
            log.warning("recovering unfinished events paused: %s", exc)
        except Exception:
            log.exception("recovering unfinished events failed; will retry")
        finally:
            self._recovering = False

    def _spawn(self, delivery: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(delivery)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _streamable(self, payload: str) -> OutboxEntry | None:
        """The entry, if it goes out through the v2 stream in a batch (meter leg, v2 configured)."""
        if self.writer.meter_path != "v2":
            return None
        try:
            entry = OutboxEntry.parse(payload)
        except ValueError:
            return None  # delivered alone, which dead-letters it
        return entry if entry.leg is Leg.METER else None

    async def run_once(self, *, block_ms: int | None = None) -> int:
        """One round: promote due retries, claim stale entries, read new ones, deliver them all.

        Returns how many entries were handled.
        """
        handled = await self._fill(block_ms=block_ms, promote=True)
        if self._inflight:
            await asyncio.gather(*self._inflight)
        return handled

    async def drain(self) -> None:
        """Deliver until nothing is outstanding, retries included (tests, the demo, shutdown).

        Bound it with ``anyio.fail_after`` or ``asyncio.timeout``: a shadow leg that keeps failing
        retryably keeps it waiting until ``max_age_seconds``.
        """
        while True:
            await self._fill(block_ms=None)
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=0.05, return_when=FIRST_COMPLETED)
                continue
            if (await self.outbox.depth()).outstanding == 0:
                return
            await asyncio.sleep(0.02)

    async def _deliver_stream_logged(self, items: list[tuple[ShardKeys, str, OutboxEntry]]) -> None:
        try:
            dispositions = await self.deliver_stream(items)
        except Exception:
            log.exception("delivering %d streamed entries failed; they stay pending", len(items))
            return
        for disposition in dispositions:
            self.counts[disposition] += 1

    async def _deliver_logged(self, shard: ShardKeys, entry_id: str, payload: str) -> None:
        try:
            disposition = await self.deliver(shard, entry_id, payload)
        except Exception:
            # Left pending: another round (or another worker) claims it after the idle time.
            log.exception("delivering outbox entry %s failed; it stays pending", entry_id)
            return
        self.counts[disposition] += 1

    async def deliver(self, shard: ShardKeys, entry_id: str, payload: str) -> Disposition:
        """Write one entry to Stripe and settle it."""
        try:
            entry = OutboxEntry.parse(payload)
        except ValueError:
            log.error("outbox entry %s is unreadable; dead-lettering it", entry_id)
            return await self._dead_unreadable(shard, entry_id, payload)
        if self._set_turns is not None and entry.leg is Leg.LEGACY and entry.set_seq is not None:
            return await self._deliver_set(shard, entry_id, entry, self._set_turns, entry.set_seq)
        # The settle releases the v1 meter turn in its own round trip; the turn is held until then.
        async with self.writer.delivery(
            entry.leg, entry.event, value=entry.value, max_wait=self.max_wait
        ) as (result, turn):
            disposition = await self._settle_result(
                shard, entry_id, entry, result, turn=turn, notify=False
            )
        if disposition == "accepted":
            await self._notify_accepted(entry)
        return disposition

    async def _deliver_set(
        self, shard: ShardKeys, entry_id: str, entry: OutboxEntry, turns: SetTurns, seq: int
    ) -> Disposition:
        """A ``set``'s legacy shadow, in intercept order: skipped (settled as accepted: the later
        set's value is what Stripe must keep) once a later set at its item and timestamp was
        committed; written only while no other legacy write there is in flight."""
        token = uuid.uuid4().hex
        verdict = await turns.begin(shard, entry.event, seq, token)
        if verdict == "superseded":
            update = LedgerUpdate(shard, entry.event, entry.period)
            update.shadow_accepted(entry.leg, entry.value)
            done = await self.outbox.settle(shard, entry_id, update)
            return "accepted" if done else "skipped"
        if verdict == "busy":  # not an attempt: come back once the other write is done
            due = self._clock() + self._backoff(0, None)
            return (
                "retry"
                if await self.outbox.reschedule(shard, entry_id, entry, due=due)
                else "skipped"
            )
        try:
            async with self.writer.delivery(
                entry.leg, entry.event, value=entry.value, max_wait=self.max_wait
            ) as (result, turn):
                return await self._settle_result(shard, entry_id, entry, result, turn=turn)
        finally:
            await turns.end(shard, entry.event, token)

    async def deliver_stream(
        self, items: list[tuple[ShardKeys, str, OutboxEntry]]
    ) -> list[Disposition]:
        """Write up to 100 meter-leg entries in one call of the v2 stream, then settle each (the
        accepted ones in one round trip)."""
        results = await self.writer.write_meter_batch(
            [(entry.event, entry.value) for _, _, entry in items], max_wait=self.max_wait
        )
        pairs = list(zip(items, results, strict=True))
        accepted = [(item, result) for item, result in pairs if result.accepted]
        settled: dict[str, Disposition] = {}
        if accepted:
            now = self._clock()
            updates = []
            for (shard, entry_id, entry), result in accepted:
                instruments.count_shadow(entry, result, now)
                update = LedgerUpdate(shard, entry.event, entry.period)
                updates.append((shard, entry_id, update.shadow_accepted(entry.leg, entry.value)))
            done = await self.outbox.settle_many(updates)
            for ((_, entry_id, entry), _result), ok in zip(accepted, done, strict=True):
                if ok:
                    await self._notify_accepted(entry)
                settled[entry_id] = "accepted" if ok else "skipped"
        return [
            settled[entry_id]
            if result.accepted
            else await self._settle_result(shard, entry_id, entry, result)
            for (shard, entry_id, entry), result in pairs
        ]

    async def _notify_accepted(self, entry: OutboxEntry) -> None:
        """Tell ``on_meter_accepted`` about a settled meter write."""
        if entry.leg is Leg.METER and self._on_meter_accepted is not None:
            await self._on_meter_accepted(
                entry.event, value=entry.value, stage=entry.stage, period=entry.period
            )

    async def _settle_result(
        self,
        shard: ShardKeys,
        entry_id: str,
        entry: OutboxEntry,
        result: WriteResult,
        *,
        turn: MeterTurn | None = None,
        notify: bool = True,
    ) -> Disposition:
        """Acknowledge, reschedule or dead-letter an entry according to its write's result.

        ``turn`` (the write's meter turn) is released by the settle when it is accepted or dead;
        ``notify`` False leaves ``on_meter_accepted`` to the caller.
        """
        instruments.count_shadow(entry, result, self._clock())
        update = LedgerUpdate(shard, entry.event, entry.period)
        if result.accepted:
            update.shadow_accepted(entry.leg, entry.value)
            done = await self.outbox.settle(shard, entry_id, update, turn=turn)
            if done and notify:
                await self._notify_accepted(entry)
            return "accepted" if done else "skipped"
        failure = result.failure
        age = self._clock() - entry.enqueued_at
        if failure is not None and failure.retryable and age < self.settings.max_age_seconds:
            delay = self._backoff(entry.attempt, failure.retry_after)
            retry = entry.model_copy(
                update={"attempt": entry.attempt + 1, "last_error": describe_failure(failure)}
            )
            done = await self.outbox.reschedule(shard, entry_id, retry, due=self._clock() + delay)
            return "retry" if done else "skipped"
        return await self._dead(
            shard,
            entry_id,
            entry,
            result,
            expired=failure is not None and failure.retryable,
            turn=turn,
        )

    async def _dead(
        self,
        shard: ShardKeys,
        entry_id: str,
        entry: OutboxEntry,
        result: WriteResult,
        *,
        expired: bool,
        turn: MeterTurn | None = None,
    ) -> Disposition:
        failure = result.failure
        # Retired: Stripe refused the usage record because the item left the legacy system (moved
        # to its meter-backed price), not because of the write. Only that refusal, as Stripe words
        # it (400 invalid_request_error), is retired; every other legacy refusal is divergence.
        retired = (
            entry.leg is Leg.LEGACY
            and not expired
            and failure is not None
            and failure.http_status == 400
            and failure.type == "invalid_request_error"
            and RETIRED_LEGACY_MARKER in failure.message
        )
        code = failure_code(failure, expired=expired)
        update = LedgerUpdate(shard, entry.event, entry.period).shadow_failed(
            entry.leg, entry.value, retired=retired, code=code
        )
        divergence = None
        if not retired:
            shadow_view = LegView.of(result)
            if expired:
                shadow_view = shadow_view.model_copy(update={"status": "expired"})
            authoritative_view = LegView(status="accepted", stripe_id=entry.authoritative_id)
            legacy, meter = (
                (shadow_view, authoritative_view)
                if entry.leg is Leg.LEGACY
                else (authoritative_view, shadow_view)
            )
            divergence = divergence_fields(
                entry.event,
                kind="shadow_expired" if expired else "shadow_refused",
                stage=entry.stage,
                legacy=legacy,
                meter=meter,
                note=f"after {entry.attempt + 1} attempt(s)",
                at=self._clock(),
            )
        dead = {
            "entry": entry.payload(),
            "reason": "expired" if expired else (RETIRED if retired else "refused"),
            "code": code,
            "error": describe_failure(failure) or "",
            "at": f"{self._clock():.3f}",
        }
        done = await self.outbox.settle(
            shard, entry_id, update, divergence=divergence, dead=dead, turn=turn
        )
        if done:  # once: only the settle that dead-letters the entry gets here
            instruments.count_dead(entry.leg, dead["reason"])
            log.log(
                logging.INFO if retired else logging.WARNING,
                "shadow %s write of %s for %s dead-lettered (%s, %s): %s",
                entry.leg.value,
                entry.event.identifier,
                entry.event.customer,
                dead["reason"],
                code,
                dead["error"] or "no error from Stripe",
                extra={
                    "event": "dualwrite.dead_letter",
                    "customer": entry.event.customer,
                    "identifier": entry.event.identifier,
                    "leg": entry.leg.value,
                    "reason": dead["reason"],
                    "code": code,
                },
            )
        return "dead" if done else "skipped"

    async def _dead_unreadable(self, shard: ShardKeys, entry_id: str, payload: str) -> Disposition:
        await self.outbox.dead_letter_raw(
            shard, entry_id, payload, reason="unreadable", at=self._clock()
        )
        return "dead"

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.settings.backoff_max, self.settings.backoff_base * 2**attempt)
        delay = self._rng.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)
