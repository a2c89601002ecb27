"""``CutoverOps``: rollouts, cutovers and rollbacks on top of the flag store, for the CLI and APIs.

Every operation reads what it needs, checks all of its input, and only then changes anything; a
dry run stops before the first change and returns the very changes (and Stripe calls) it would
make. Every change goes through ``RedisFlagStore``, so it is atomic, audited with the actor and the
reason, and published to every resolver.

How each operation uses the flags (resolution: kill → override → schedule → rollout → default):

* a percentage rollout raises ``rollout:<stage>`` (raising only adds customers);
* a named cohort moves by override (pinned until rolled back or cut over);
* a cutover schedules the stage at an instant; a customer holding an override gets a schedule
  entry for its current stage from now, then loses the override, so nothing changes before the
  instant;
* a rollback pins the customer by override and clears its schedule (``_rollback``: one stage at
  a time, and never where Stripe refuses the customer's authoritative leg).

The steps every operation shares (plan each customer, refuse all or nothing, apply the changes,
report them) are in ``_apply``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import redis.asyncio as aioredis

from dualwrite.config import Settings
from dualwrite.cutover._apply import finish, kill_switch_notes, plan_each
from dualwrite.cutover._cohorts import At, CutoverInputError, check_move
from dualwrite.cutover._guard import GUARD_ACTOR, Guard
from dualwrite.cutover._models import FlagChange, GuardResult, OperationResult, StripeCall
from dualwrite.cutover._plans import (
    check_rollout,
    cutover_changes,
    override_change,
    reason_text,
    rollout_change,
)
from dualwrite.cutover._prices import ItemChecks
from dualwrite.cutover._rollback import kill, rollback_all, rollback_customers, step_back_all
from dualwrite.cutover._stripe import CutoverStripe, check_schedulable, plan_schedule
from dualwrite.flags import (
    ROLLOUT_STAGES,
    CustomerBilling,
    FlagSnapshot,
    RedisFlagStore,
    StageResolver,
    resolve_snapshot,
)
from dualwrite.keys import KeySpace
from dualwrite.ledger import Ledger
from dualwrite.models import Stage, utc_time
from dualwrite.test_clocks import StripeTestClocks, customer_now

__all__ = ["CutoverOps"]

StripeFactory = Callable[[], CutoverStripe]


class CutoverOps:
    """The operations people (and the guard) use to move customers between stages.

    Args:
        redis: a client with ``decode_responses=True``.
        keys: the key layout.
        settings: flag salt, Stripe settings and key, guardrails.
        clock: Unix time; schedules are judged against it.
        stripe: makes the Stripe adapter (default: from ``settings`` and ``STRIPE_API_KEY``).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        stripe: StripeFactory | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._clock = clock
        self._store = RedisFlagStore(redis, keys, clock=clock)
        self._stripe_factory = stripe
        self._test_clocks = StripeTestClocks(self._stripe)

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client the operations use."""
        return self._redis

    @property
    def keys(self) -> KeySpace:
        """The key layout."""
        return self._keys

    @property
    def settings(self) -> Settings:
        """The settings the operations read (flag salt, Stripe, guardrails)."""
        return self._settings

    @property
    def store(self) -> RedisFlagStore:
        """The flag store every change goes through."""
        return self._store

    def _stripe(self) -> CutoverStripe:
        if self._stripe_factory is not None:
            return self._stripe_factory()
        api_key = self._settings.stripe_api_key_value()
        if not api_key:
            msg = "STRIPE_API_KEY is not set: reading the billing period needs the account's key"
            raise CutoverInputError(msg)
        return CutoverStripe(self._settings.stripe, api_key=api_key)

    @property
    def test_clocks(self) -> StripeTestClocks:
        """Reads the Stripe test clocks customers live on (``dualwrite.test_clocks``)."""
        return self._test_clocks

    async def now_of(self, customer: str, billing: CustomerBilling | None = None) -> int:
        """The customer's "now", whole seconds: its Stripe test clock's frozen time when it lives
        on one, else the operations' clock. Schedules and period ends are judged against it."""
        if billing is None:
            billing = await self._store.billing_of(customer)
        return int(await customer_now(billing.test_clock, self._test_clocks, self._clock()))

    async def nows(self, customers: Iterable[str]) -> dict[str, int]:
        """Each customer's "now" (``now_of``), the billing facts read once for all."""
        billings = await self._store.billings()
        return {c: await self.now_of(c, billings.get(c, CustomerBilling())) for c in customers}

    async def forget_price_move(self, customer: str, *, actor: str, reason: str) -> None:
        """Record that ``customer``'s pending price move was released in Stripe (the kill switch
        no longer holds it at ``primary`` from that instant)."""
        billing = await self._store.billing_of(customer)
        if billing.price_move_at is not None:
            update = billing.model_copy(update={"price_move_at": None})
            await self._store.set_billing(customer, update, actor=actor, reason=reason)

    async def stage_of(self, customer: str) -> tuple[Stage, FlagSnapshot]:
        """The customer's stage now (by its own clock), and the flags it was resolved from."""
        snapshot = await self._store.snapshot(customer)
        now = await self.now_of(customer, snapshot.billing)
        resolution = resolve_snapshot(
            customer, snapshot, now=now, salt=self._settings.flags.rollout_salt
        )
        return resolution.stage, snapshot

    # -- rollout ---------------------------------------------------------------------------------

    async def rollout(
        self,
        stage: Stage,
        *,
        percent: float | None = None,
        customers: Sequence[str] | None = None,
        actor: str,
        reason: str = "",
        force: bool = False,
        dry_run: bool = False,
    ) -> OperationResult:
        """A percentage rollout (``percent``) or a named cohort (``customers``) to ``stage``."""
        if (percent is None) == (customers is None):
            msg = "give a percentage (e.g. 25%) or customers (--customers or --file), not both"
            raise CutoverInputError(msg)
        if percent is not None:
            return await self.rollout_percent(
                stage, percent, actor=actor, reason=reason, force=force, dry_run=dry_run
            )
        return await self.move_customers(
            list(customers or ()), stage, actor=actor, reason=reason, force=force, dry_run=dry_run
        )

    async def rollout_percent(
        self,
        stage: Stage,
        percent: float,
        *,
        actor: str,
        reason: str = "",
        force: bool = False,
        dry_run: bool = False,
    ) -> OperationResult:
        """Raise ``stage``'s percentage rollout to ``percent`` (lowering it needs ``force``)."""
        if stage not in ROLLOUT_STAGES:
            msg = f"no percentage rollout to {stage.value}; use shadow, primary or meter"
            raise CutoverInputError(msg)
        rollout = await self._store.get_rollout()
        default = await self._store.get_default()
        old = rollout.get(stage, 0.0)
        why = reason_text(f"rollout {stage.value} {percent:g}%", reason)
        result = OperationResult(operation="rollout", dry_run=dry_run, actor=actor, reason=why)
        if percent == old:
            return result.model_copy(
                update={"unchanged": [f"rollout {stage.value} is already {old:g}%"]}
            )
        check_rollout(stage, percent, rollout, default, force=force)
        change = rollout_change(stage, old, percent)
        if not dry_run:
            await self._store.set_rollout(stage, percent, actor=actor, reason=why)
        notes = await kill_switch_notes(self._store)
        return result.model_copy(update={"changes": [change], "notes": notes})

    async def move_customers(
        self,
        customers: Sequence[str],
        stage: Stage,
        *,
        actor: str,
        reason: str = "",
        force: bool = False,
        dry_run: bool = False,
    ) -> OperationResult:
        """Pin named customers to ``stage`` now (each one stage forward unless ``force``)."""
        why = reason_text(f"rollout {stage.value} for a cohort of {len(customers)}", reason)

        def plan(customer: str, current: Stage, snapshot: FlagSnapshot) -> list[FlagChange] | str:
            check_move(customer, current, stage, force=force)
            if current is stage and snapshot.override in (None, stage):
                return f"{customer} is already {stage.value}"
            return [override_change(customer, snapshot.override, stage, current)]

        plans, unchanged = await plan_each(customers, plan, stage_of=self.stage_of)
        return await finish(
            self._store,
            "rollout",
            plans,
            actor=actor,
            reason=why,
            dry_run=dry_run,
            unchanged=unchanged,
        )

    # -- cutover ---------------------------------------------------------------------------------

    async def cutover(
        self,
        customer: str,
        stage: Stage,
        *,
        at: At,
        actor: str,
        reason: str = "",
        force: bool = False,
        with_schedule: bool = False,
        price: str | None = None,
        dry_run: bool = False,
    ) -> OperationResult:
        """Move ``customer`` to ``stage`` at ``at`` (its period end, now, or a Unix time).

        With ``with_schedule`` (``stage`` primary, ``at`` period-end), also create the Stripe
        subscription schedule moving its legacy item to ``price`` at that same instant.
        """
        current, snapshot = await self.stage_of(customer)
        check_move(customer, current, stage, force=force)
        if with_schedule and (stage is not Stage.PRIMARY or at != "period-end" or not price):
            msg = (
                "--with-schedule moves the item to the meter-backed price at the period end: "
                "it needs --to primary, --at period-end and --price price_…"
            )
            raise CutoverInputError(msg)
        billing = snapshot.billing
        calls: list[StripeCall] = []
        stripe = self._stripe() if at == "period-end" else None
        try:
            if stripe is not None:
                period = await stripe.subscription_period(customer)
                # A subscription on a test clock ends its period by the clock's time: the
                # schedule entry is judged by it from now on.
                billing = billing.model_copy(update={"test_clock": period.test_clock})
                when = period.current_period_end
                if with_schedule:
                    billing = billing.model_copy(update={"price_move_at": when})
                calls.append(
                    StripeCall(
                        method="GET",
                        path="/v1/subscriptions",
                        params={"customer": customer, "status": "active"},
                        stripe_version=stripe.stripe_version,
                        result_id=period.subscription,
                    )
                )
                if with_schedule and price is not None:
                    await check_schedulable(stripe, period, price)
                    calls += plan_schedule(
                        period, price=price, at=when, stripe_version=stripe.stripe_version
                    )
            now = await self.now_of(customer, billing)
            if at == "now":
                when = now
            elif stripe is None:
                when = int(at)
                if when < now:
                    msg = (
                        f"--at {utc_time(when)} is in the past (now is {utc_time(now)}); "
                        "use --at now to move it at once"
                    )
                    raise CutoverInputError(msg)
            why = reason_text(f"cutover {customer} to {stage.value} at {utc_time(when)}", reason)
            changes = cutover_changes(customer, snapshot, current, stage, when, now)
            if not dry_run and stripe is not None and with_schedule and price is not None:
                made = await stripe.schedule_price_move(period, price=price, at=when)
                calls = calls[:1] + made
            if not dry_run:
                await self._store.set_billing(customer, billing, actor=actor, reason=why)
        finally:
            if stripe is not None:
                await stripe.aclose()
        return await finish(
            self._store,
            "cutover",
            changes,
            actor=actor,
            reason=why,
            dry_run=dry_run,
            stripe_calls=calls,
        )

    # -- rollback (``_rollback``) -----------------------------------------------------------------

    def now(self) -> int:
        """The operations' clock, in whole seconds (schedules are judged against it)."""
        return int(self._clock())

    def item_checks(self, operation: str) -> ItemChecks:
        """Stripe reads and releases for one rollback (``_prices``); close it when done."""
        return ItemChecks(self._stripe, operation=operation)

    async def rollback(
        self,
        customers: Sequence[str],
        *,
        to: Stage | None = None,
        actor: str,
        reason: str = "",
        force: bool = False,
        dry_run: bool = False,
        operation: str = "rollback",
    ) -> OperationResult:
        """Pin each customer to ``to`` (default: the stage before its own) and clear its schedule.

        More than one stage back needs ``force``. A customer whose item already moved to its
        meter-backed price stops at ``primary`` (``OperationResult.held``); a pending cutover's
        Stripe schedule is released first, so the price stays legacy.
        """
        return await rollback_customers(
            self,
            customers,
            to=to,
            actor=actor,
            reason=reason,
            force=force,
            dry_run=dry_run,
            operation=operation,
        )

    async def rollback_all(
        self,
        *,
        to: Stage = Stage.LEGACY,
        actor: str,
        reason: str = "",
        force: bool = False,
        dry_run: bool = False,
    ) -> OperationResult:
        """Everyone back to ``to`` at most: rollouts beyond it to 0, the default, overrides and
        schedules beyond it back to it. Customers already at or before ``to`` stay; anything
        moving more than one stage needs ``force``; price moves are kept as ``rollback`` does."""
        return await rollback_all(
            self, to=to, actor=actor, reason=reason, force=force, dry_run=dry_run
        )

    async def step_back_all(
        self, *, actor: str, reason: str, dry_run: bool = False
    ) -> OperationResult:
        """Every percentage rollout and the default one stage back, pending cutovers cancelled
        (their Stripe schedules released): the guard's global rollback."""
        return await step_back_all(self, actor=actor, reason=reason, dry_run=dry_run)

    async def kill(self, *, actor: str, reason: str, dry_run: bool = False) -> OperationResult:
        """Turn the kill switch on (every customer legacy at once) and cancel pending cutovers."""
        return await kill(self, actor=actor, reason=reason, dry_run=dry_run)

    # -- guard -----------------------------------------------------------------------------------

    def guard(self) -> Guard:
        """A guard on this Redis with the configured guardrails (``Guard.run`` for a loop)."""
        ledger = Ledger(
            self._redis, self._keys, divergence_maxlen=self._settings.ledger.divergence_maxlen
        )
        resolver = StageResolver(
            self._redis,
            self._keys,
            self._settings.flags,
            clock=self._clock,
            test_clocks=self._test_clocks,
        )
        return Guard(
            self,
            ledger,
            resolver,
            self._settings.guardrails,
            report=self._settings.report,
            clock=self._clock,
        )

    async def guard_once(
        self, *, dry_run: bool = False, actor: str = GUARD_ACTOR, reason: str = ""
    ) -> GuardResult:
        """One guard pass: roll back the customers (or the rollout) over the guardrails."""
        return await self.guard().check(dry_run=dry_run, actor=actor, reason=reason)
