"""``record(event)``: claim the event with its plan, make the authoritative write, enqueue the shadow.

The event is first claimed in Redis with the plan of its first intercept (``dualwrite.idempotency``):
a caller's retry, whatever the customer's stage has become, writes the same legs under the same
keys, and an event whose holder died before its commit is finished by the workers
(``dualwrite.recovery``). The authoritative write is synchronous and its result is what the caller
sees. The shadow write is enqueued only when the authoritative one succeeded (so both legs hold the
same usage), in one Redis transaction with the ledger update and the claim's resolution, and
delivered by an ``OutboxWorker``. Nothing about the shadow leg can fail the request: if Redis is
down after Stripe accepted the authoritative write, the caller still gets its success and the
commit is spooled (or, with no spool, the loss is logged loudly).

This module holds the claim and the engine's lifecycle; the write and what is persisted once it
answered (the commit, refusal counting, back-pressure) are in ``dualwrite._claim_driver``; item reads
(billing periods, ownership) in ``dualwrite.items``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

import redis.asyncio as aioredis

from dualwrite._claim_driver import ClaimDriver, LegacyWrite, held_back, refused_before_writing
from dualwrite.config import Settings
from dualwrite.exceptions import (
    ConflictError,
    FutureTimestampError,
    IdempotencyError,
    StoreUnavailableError,
    UsageInputError,
)
from dualwrite.flags import StageResolver
from dualwrite.idempotency import Claim, IdempotencyStore, SetOrder
from dualwrite.items import ItemReads
from dualwrite.keys import KeySpace, ShardKeys
from dualwrite.late_refusals import LateRefusals
from dualwrite.ledger import CommitWriter, Ledger
from dualwrite.models import (
    EventPlan,
    Leg,
    RecordOutcome,
    Stage,
    StagePlan,
    StripeFailure,
    UsageEvent,
)
from dualwrite.outbox import Outbox, OutboxWorker
from dualwrite.periods import PeriodResolver
from dualwrite.rate_limits import TokenAsk, WriteLimits
from dualwrite.recovery import recover_due
from dualwrite.redis_client import is_cluster
from dualwrite.spool import Spool, default_spool_dir
from dualwrite.stores import Stores
from dualwrite.stripe_io import ItemDetails, StripeWriter
from dualwrite.test_clocks import stripe_test_clocks

__all__ = ["DualWriteEngine", "LegacyWrite", "StageSource"]

log = logging.getLogger(__name__)

CLOCK_UNREAD = StripeFailure(
    http_status=503,
    type="api_connection_error",
    code="stripe_clock_unread",
    message=(
        "Stripe could not be reached to read its clock, which timestamps usage sent without a "
        "timestamp; nothing was written: retry"
    ),
    retryable=True,
    retry_after=1.0,
)
"""The answer to usage without a timestamp while Stripe's clock is unknown (nothing written)."""


class StageSource(Protocol):
    """Anything that tells a customer's stage (``StageResolver`` in production)."""

    async def resolve(self, customer: str) -> Stage:
        """The customer's stage; never raises."""
        ...


class DualWriteEngine:
    """The dual-write engine shared by the middleware, the proxy and the workers.

    Build it with ``DualWriteEngine.from_settings(settings)`` and use it as an async context manager
    (or call ``start()`` and ``aclose()``).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        stores: Stores,
        resolver: StageSource,
        writer: StripeWriter,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.stores = stores
        """Redis, the key space, the ledger and the outbox: what the front doors share with it."""
        redis = stores.redis
        self.resolver = resolver
        self.writer = writer
        self.idempotency = IdempotencyStore(
            redis,
            ttl_seconds=settings.ledger.idempotency_ttl_seconds,
            lease_seconds=settings.ledger.inflight_lease_seconds,
        )
        self.set_order = SetOrder(redis, lease_seconds=settings.limits.turn_lease_seconds)
        self.commits = CommitWriter(redis, divergence_maxlen=settings.ledger.divergence_maxlen)
        self.late = LateRefusals(redis, stores.keys, writer, settings, clock=clock)
        self.items = ItemReads(settings, writer)
        self.periods = PeriodResolver(redis, stores.keys, self.items.periods, clock=clock)
        self.items.attach(self.periods)
        self.spool: Spool | None = None
        if settings.outbox.spool:
            self.spool = Spool(
                settings.outbox.spool_dir or default_spool_dir(),
                max_bytes=settings.outbox.spool_max_bytes,
            )
        self.driver = ClaimDriver(
            settings,
            redis=redis,
            writer=writer,
            idempotency=self.idempotency,
            set_order=self.set_order,
            commits=self.commits,
            late=self.late,
            spool=self.spool,
            period=self._period,
            clock=clock,
        )
        self.worker: OutboxWorker | None = None
        self._clock = clock
        self._owns_resources = False
        self._replayer: asyncio.Task[None] | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._cluster = is_cluster(redis)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> DualWriteEngine:
        """Open the stores (``Stores.open``), the stage resolver and the Stripe writer described by
        ``settings``; ``aclose()`` closes them."""
        stores = Stores.open(settings)
        redis, keys = stores.redis, stores.keys
        resolver = StageResolver(
            redis, keys, settings.flags, clock=clock, test_clocks=stripe_test_clocks(settings)
        )
        writer = StripeWriter(
            settings.stripe,
            api_key=settings.stripe_api_key_value(),
            meters=settings.meter,
            limits=WriteLimits(redis, keys, settings.limits),
            clock=clock,
        )
        engine = cls(settings, stores=stores, resolver=resolver, writer=writer, clock=clock)
        engine._owns_resources = True
        return engine

    async def start_once(self) -> None:
        """``start()`` unless already started: for apps that start the engine with their lifespan
        or, when the server runs no lifespan, at their first request."""
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self.start()

    async def start(self, *, worker: bool | None = None) -> None:
        """Subscribe to flag changes and, unless ``worker`` is False, start the in-process worker.

        Redis being down at start is not fatal: the resolver falls back to the safe stage and the
        worker retries until Redis answers.
        """
        self._started = True
        if isinstance(self.resolver, StageResolver):
            await self.resolver.start()
        if self.spool is not None and self._replayer is None:
            self._replayer = asyncio.create_task(
                self._replay_spool(self.spool), name="dualwrite-spool"
            )
        run_worker = self.settings.outbox.run_in_process if worker is None else worker
        if run_worker and self.worker is None:
            self.worker = self.new_worker()
            await self.worker.start()  # Redis down: it starts all the same and waits for Redis

    def new_worker(self, *, consumer: str | None = None) -> OutboxWorker:
        """An outbox worker on this engine's outbox and writer (not started)."""
        return OutboxWorker(
            self.stores.outbox,
            self.writer,
            consumer=consumer,
            clock=self._clock,
            max_wait=self.settings.limits.worker_max_wait,
            on_meter_accepted=self.late.remember,
            recover=self.recover,
            set_turns=self.set_order,
        )

    async def _replay_spool(self, spool: Spool) -> None:
        """Replay spooled commits whenever there are some and Redis answers."""
        while True:
            try:
                if spool.pending():
                    await spool.replay(self.commits)
            except Exception:
                log.exception("replaying the spool failed; will retry")
            await asyncio.sleep(self.settings.outbox.spool_replay_seconds)

    async def aclose(self) -> None:
        """Stop the worker (its unfinished entries stay pending for another) and close what it opened."""
        self._started = False
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
            self._replayer = None
        if self.worker is not None:
            await self.worker.aclose()
            self.worker = None
        if isinstance(self.resolver, StageResolver):
            await self.resolver.aclose()
        if self._owns_resources:
            await self.writer.aclose()
            await self.stores.aclose()

    @property
    def redis(self) -> aioredis.Redis:
        """``stores.redis`` (kept for callers outside dualwrite; dualwrite's own modules use
        ``stores``)."""
        return self.stores.redis

    @property
    def keys(self) -> KeySpace:
        """``stores.keys`` (kept for compatibility, as ``redis``)."""
        return self.stores.keys

    @property
    def ledger(self) -> Ledger:
        """``stores.ledger`` (kept for compatibility, as ``redis``)."""
        return self.stores.ledger

    @property
    def outbox(self) -> Outbox:
        """``stores.outbox`` (kept for compatibility, as ``redis``)."""
        return self.stores.outbox

    async def __aenter__(self) -> DualWriteEngine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def now(self) -> int:
        """The instant a usage ``timestamp`` of ``now`` (or none) is minted with at intercept:
        Stripe's clock as its replies tell it, never later than Stripe's own now
        (``StripeClock``); this host's clock until Stripe has answered once. ``record`` fixes
        the instant again from Stripe's clock (reading it first if no reply was seen yet), or
        for a customer on a Stripe test clock to the clock's frozen time."""
        return self.writer.clock.now()

    async def event_at_now(self, build: Callable[[int], UsageEvent]) -> UsageEvent:
        """``build(now)``: the usage event a request makes at this instant (``now()``).

        Before this process has seen a reply from Stripe, ``now()`` is this host's clock, which
        may be behind Stripe's: a timestamp it finds too far in the future is judged again by
        Stripe's clock, read first, as Stripe would judge it.

        Raises:
            UsageInputError: the request cannot become a usage event (from ``build``).
        """
        try:
            return build(self.now())
        except FutureTimestampError:
            if self.writer.clock.known or await self.writer.stripe_now() is None:
                raise
            return build(self.now())

    async def record(
        self,
        event: UsageEvent,
        *,
        api_key: str | None = None,
        legacy_write: LegacyWrite | None = None,
        legacy_expand: tuple[str, ...] = (),
    ) -> RecordOutcome:
        """Record one usage event at the customer's stage (or, for a retry, with the plan of its
        first intercept).

        Args:
            event: the usage, fixed at intercept.
            api_key: a Stripe key to write with instead of ``STRIPE_API_KEY`` (the proxy's caller's).
            legacy_write: makes the authoritative legacy write instead of the engine's own writer,
                once, without in-request retries (the proxy forwards its caller's request, under
                the caller's own Idempotency-Key, with ``legacy_expand``).

        Returns:
            The outcome; ``outcome.accepted`` is False when Stripe refused the authoritative write
            (its error is in ``outcome.authoritative.failure``).

        Raises:
            UsageInputError: the event cannot be written at this stage (e.g. no subscription item
                for a legacy write, or a ``set`` on a meter whose policy refuses it), or its
                subscription item belongs to another customer.
            IdempotencyError: the identifier was used before for different usage.
            ConflictError: the identifier is being recorded by another request right now (or, for
                a ``set``, another set at its item and timestamp is).
        """
        stage = await self.resolver.resolve(event.customer)
        plan = EventPlan.at(stage)
        if event.timestamp_source == "intercept":
            fixed = await self._fix_now(event)
            if isinstance(fixed, StripeFailure):  # no instant to write at: retry, nothing written
                return refused_before_writing(event, stage, plan.legs, fixed)
            event = fixed
        if legacy_write is not None and plan.authoritative is Leg.LEGACY:
            caller_key = event.identifier_source == "idempotency_key"
            plan = plan.model_copy(
                update={
                    "legacy_key": event.identifier if caller_key else None,
                    "legacy_expand": legacy_expand,
                }
            )
        self._check_writable(event, stage, plan.legs)
        unreadable = await self.items.check_owner(event, api_key=api_key)
        if unreadable is not None:  # the item's owner could not be read: retry, nothing written
            return refused_before_writing(event, stage, plan.legs, unreadable)
        shard = self.stores.keys.for_customer(event.customer)
        if self.spool is not None and self.spool.full():
            return held_back(
                event, stage, plan.legs, retry_after=self.settings.outbox.spool_replay_seconds
            )
        claim, prepaid = await self._claim(shard, event, plan, self._token_ask(plan, legacy_write))
        if claim.state == "done" and claim.outcome is not None:
            return claim.outcome.model_copy(update={"replayed": True})
        if claim.state in ("busy", "set_busy"):
            msg = (
                f"usage with identifier {event.identifier!r} is being recorded by another "
                "request; retry"
                if claim.state == "busy"
                else f"another set on {event.subscription_item} at {event.timestamp} is being "
                "recorded; retry"
            )
            raise ConflictError(msg)
        if claim.state == "mismatch":
            msg = (
                f"identifier {event.identifier!r} was already used for different usage; "
                "use a new Idempotency-Key for new usage"
            )
            raise IdempotencyError(msg)
        if claim.event is not None:
            event = claim.event  # a retry writes the event as first intercepted (same "now")
        if claim.plan is not None:
            plan = claim.plan  # ... and its legs, under its keys, whatever the stage is now
        return await self.driver.drive(
            shard, event, plan, claim, api_key=api_key, legacy_write=legacy_write, prepaid=prepaid
        )

    async def _fix_now(self, event: UsageEvent) -> UsageEvent | StripeFailure:
        """The event with its minted "now" fixed to the customer's time as Stripe sees it, or
        the retryable failure to answer when Stripe's clock could not be read yet.

        Fixed here, not only at intercept: usage minted before this process had read Stripe's
        clock carries this host's time, and may reach here after another request has read it."""
        clocked = (
            await self.resolver.test_clock_now(event.customer)
            if isinstance(self.resolver, StageResolver)
            else None
        )
        if clocked is not None:
            # A customer on a Stripe test clock: Stripe judges its usage by the clock's frozen
            # time (a usage record outside the clock's current period is refused).
            return event.model_copy(update={"timestamp": int(clocked)})
        stripe_now = await self.writer.stripe_now()
        if stripe_now is None:
            return CLOCK_UNREAD
        if stripe_now == event.timestamp:
            return event
        return event.model_copy(update={"timestamp": stripe_now})

    async def redrive(self, shard: ShardKeys, claim: Claim) -> RecordOutcome | None:
        """Finish an event whose claim recovery took over (``dualwrite.recovery``): replay its
        authoritative write under the same key (Stripe answers with the original result) and
        commit it with its shadow."""
        if claim.event is None or claim.plan is None:
            return None
        return await self.driver.drive(shard, claim.event, claim.plan, claim, api_key=None)

    async def recover(self, *, limit: int = 100) -> int:
        """Re-drive the claims due for recovery (the workers call this); returns how many.

        Without ``STRIPE_API_KEY`` nothing is re-driven (every write would be refused, and a
        refusal must not resolve a claim whose first attempt may have been written).
        """
        if self.settings.stripe_api_key_value() is None:
            return 0
        return await recover_due(
            self.idempotency, self.stores.keys, self.redrive, now=self._clock(), limit=limit
        )

    def _check_writable(self, event: UsageEvent, stage: Stage, plan: StagePlan) -> None:
        legs = {plan.authoritative, plan.shadow}
        if Leg.LEGACY in legs and event.subscription_item is None:
            msg = (
                f"subscription_item is required: customer {event.customer} is at stage "
                f"{stage.value}, which writes usage records"
            )
            raise UsageInputError(msg, param="subscription_item", code="parameter_missing")
        if event.action == "set" and Leg.METER in legs:
            if self.settings.meter(event.event_name).set_policy == "refuse":
                msg = (
                    f"action=set has no meter equivalent and meter {event.event_name!r} refuses it "
                    '(set_policy = "refuse"); send increments instead'
                )
                raise UsageInputError(msg, param="action", code="parameter_invalid")
            if event.subscription_item is None:
                msg = "action=set needs subscription_item (the value is set per item and timestamp)"
                raise UsageInputError(msg, param="subscription_item", code="parameter_missing")

    def _token_ask(self, plan: EventPlan, legacy_write: LegacyWrite | None) -> TokenAsk | None:
        """The legacy rate's unit to take in the claim's round trip: when the engine's writer
        makes the authoritative legacy write and that path takes its units one by one (not on a
        Cluster, where the limit's key is in another slot than the claim's)."""
        limits = self.writer.limits
        if (
            limits is None
            or self._cluster
            or legacy_write is not None
            or plan.authoritative is not Leg.LEGACY
        ):
            return None
        return limits.single_ask("legacy")

    async def _claim(
        self, shard: ShardKeys, event: UsageEvent, plan: EventPlan, ask: TokenAsk | None
    ) -> tuple[Claim, TokenAsk | None]:
        """The claim, and the legacy rate's unit when one was granted with it for the write
        this claim now holds (given back at once when the claim holds none: a replay, a busy or
        mismatched identifier, or a retry whose first plan writes the meter first)."""
        try:
            claim, ridden = await self.idempotency.claim_riding(
                shard, event, plan, now=self._clock(), ride=ask
            )
        except StoreUnavailableError:
            # Stripe's own idempotency on the per-leg keys still stops a retried write counting twice.
            log.warning(
                "Redis unavailable: recording %s without an idempotency record", event.identifier
            )
            return Claim("untracked"), None
        limits = self.writer.limits
        if ask is None or limits is None or not limits.granted(ask, ridden):
            return claim, None
        if claim.held and claim.plan is not None and claim.plan.authoritative is Leg.LEGACY:
            return claim, ask
        await limits.refund(ask)
        return claim, None

    async def _period(self, event: UsageEvent, api_key: str | None) -> str:
        """The ledger period of ``event``: its item's billing period, or its UTC day."""
        if self.settings.ledger.periods == "day":
            return event.period
        return (await self.periods.period_for(event, api_key=api_key)).id

    async def retrieve_item(self, item: str, *, api_key: str) -> ItemDetails | StripeFailure:
        """Read a subscription item from Stripe (the proxy maps usage with it), keeping its billing
        period and customer for the ledger and the ownership check, so that one read serves all."""
        return await self.items.retrieve(item, api_key=api_key)
