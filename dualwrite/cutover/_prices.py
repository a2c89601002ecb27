"""Rollbacks that keep each customer's authoritative leg one Stripe accepts.

A cutover with ``--with-schedule`` moves the legacy item to the meter-backed price at the period
end (a Stripe subscription schedule). From that instant Stripe refuses usage records for the item
("not on the legacy metered billing system"), so a stage whose authoritative leg is legacy
(``legacy``, ``shadow``) would refuse every usage request. So before a rollback takes a customer
below ``primary``, or cancels a pending cutover to ``primary``, it reads the customer's active
subscriptions (``ItemChecks.check``):

* the item still on its legacy price, with a dualwrite cutover schedule that would move it later:
  the schedule is released (``POST /v1/subscription_schedules/{id}/release``: the subscription
  keeps its current price, the later phases are dropped), and the result says so;
* the item already on a meter-backed price: the customer stops at ``primary``, the last stage
  whose authoritative leg Stripe accepts, with a message saying why and how to go further;
* a schedule dualwrite did not make that moves the item later: the rollback is refused (edit or
  release that schedule in Stripe first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dualwrite.cutover._cohorts import CutoverInputError
from dualwrite.cutover._models import StripeCall
from dualwrite.cutover._stripe import (
    CUTOVER_METADATA,
    CutoverStripe,
    SubscriptionPeriod,
    plan_release,
)
from dualwrite.models import Stage

__all__ = ["ItemCheck", "ItemChecks", "crosses_price_move", "pending_cutover"]

#: The first stage whose authoritative leg is the meter (Stripe accepts it after the price move).
SAFE_STAGE = Stage.PRIMARY


def pending_cutover(schedule: Sequence[tuple[int, Stage]], now: float) -> bool:
    """Whether ``schedule`` still holds a move to ``primary`` or beyond (a cutover that may come
    with a Stripe schedule moving the item's price)."""
    return any(at > now and stage.rank >= SAFE_STAGE.rank for at, stage in schedule)


def crosses_price_move(
    current: Stage, schedule: Sequence[tuple[int, Stage]], after: Stage, now: float
) -> bool:
    """Whether a customer at ``current`` ending at ``after`` (a legacy-authoritative stage) needs
    its item checked: it leaves ``primary`` or beyond, or loses a pending cutover."""
    if after.rank >= SAFE_STAGE.rank:
        return False
    return current.rank >= SAFE_STAGE.rank or pending_cutover(schedule, now)


@dataclass(frozen=True, slots=True)
class ItemCheck:
    """What Stripe says about a customer's metered item, for a rollback."""

    customer: str
    moved_to: str | None = None
    """The meter-backed price its item is on (Stripe refuses its usage records now)."""
    item: str | None = None
    """The item on ``moved_to``."""
    release: StripeCall | None = None
    """The release of a dualwrite cutover schedule that would move the price later."""
    release_at: int | None = None
    """When that schedule would have moved the price."""
    foreign: str | None = None
    """A schedule dualwrite did not make that moves the item off its legacy price later."""

    def held_note(self, target: Stage) -> str:
        """Why the customer stops at ``primary`` instead of ``target``."""
        return (
            f"{self.customer} stays at {SAFE_STAGE.value}, not {target.value}: its item "
            f"{self.item} is on the meter-backed price {self.moved_to}, so Stripe refuses its "
            "usage records and legacy cannot be authoritative; to go further back, move the "
            "item to a legacy price first (at a period end), then roll back again"
        )

    def released_note(self) -> str:
        """What releasing the cutover schedule did."""
        schedule = self.release.path.split("/")[-2] if self.release else "?"
        return (
            f"released Stripe schedule {schedule} of {self.customer}: its item stays on the legacy "
            f"price (the price move at {self.release_at} is cancelled)"
        )

    def foreign_problem(self) -> str:
        """Why the rollback is refused."""
        return (
            f"{self.customer}: subscription schedule {self.foreign} (not made by dualwrite) moves "
            "its item off the legacy price later; release or edit it in Stripe, then roll back"
        )


class ItemChecks:
    """The Stripe reads (and releases) of one rollback; the client is made on first use.

    Args:
        stripe: makes the Stripe adapter (``CutoverOps``'s factory).
        operation: what is being done, for the message when no key is set.
    """

    def __init__(self, stripe: Callable[[], CutoverStripe], *, operation: str) -> None:
        self._factory = stripe
        self._operation = operation
        self._stripe: CutoverStripe | None = None

    def _client(self, customer: str) -> CutoverStripe:
        if self._stripe is None:
            try:
                self._stripe = self._factory()
            except CutoverInputError:
                msg = (
                    f"STRIPE_API_KEY is not set: {self._operation} of {customer} below "
                    f"{SAFE_STAGE.value} reads its subscription from Stripe first (is its item "
                    "still on the legacy price?); set the account's key"
                )
                raise CutoverInputError(msg) from None
        return self._stripe

    async def aclose(self) -> None:
        """Close the Stripe client, if one was made."""
        if self._stripe is not None:
            await self._stripe.aclose()

    async def check(self, customer: str) -> ItemCheck:
        """Read the customer's active subscriptions (and their schedules).

        Raises:
            CutoverInputError: no Stripe key is set.
            CutoverStripeError: Stripe refused a read or could not be reached.
        """
        stripe = self._client(customer)
        subs = await stripe.subscriptions(customer)
        items = [item for sub in subs for item in sub.items]
        if not any(item.legacy_metered for item in items):
            moved = [item for item in items if item.metered]
            if moved:
                return ItemCheck(customer, moved_to=moved[0].price, item=moved[0].item)
            return ItemCheck(customer)
        for sub in subs:
            if sub.schedule is None:
                continue
            found = await stripe.schedule(sub.schedule)
            at = _moves_legacy_price_at(sub, found)
            if at is None:
                continue
            metadata = dict(found.get("metadata") or {})
            if str(metadata.get(CUTOVER_METADATA, "")).startswith(f"{customer}:"):
                call = plan_release(customer, sub.schedule, stripe_version=stripe.stripe_version)
                return ItemCheck(customer, release=call, release_at=at)
            return ItemCheck(customer, foreign=sub.schedule)
        return ItemCheck(customer)

    async def release(self, customer: str, call: StripeCall) -> StripeCall:
        """Make a release ``check`` planned; returns the call made.

        Raises:
            CutoverStripeError: Stripe refused the release.
        """
        return await self._client(customer).release_schedule(call)


def _moves_legacy_price_at(sub: SubscriptionPeriod, schedule: dict[str, Any]) -> int | None:
    """When a later phase of ``schedule`` takes a legacy price ``sub`` holds now off it (None:
    no phase does, or the schedule is no longer running)."""
    if schedule.get("status") not in ("active", "not_started"):
        return None
    current = dict(schedule.get("current_phase") or {})
    started = int(current.get("start_date") or 0)
    legacy = {item.price for item in sub.items if item.legacy_metered}
    for phase in schedule.get("phases") or []:
        start = int(phase.get("start_date") or 0)
        prices = {str(entry.get("price")) for entry in phase.get("items") or []}
        if start > started and legacy - prices:
            return start
    return None
