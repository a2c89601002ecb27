"""The values the flag store reads and writes: snapshots, resolutions and audit entries."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dualwrite.models import Stage

__all__ = [
    "ROLLOUT_STAGES",
    "AuditEntry",
    "CustomerBilling",
    "FlagSnapshot",
    "Resolution",
    "ResolutionReason",
]

#: The stages a percentage rollout can move customers to, least advanced first.
ROLLOUT_STAGES = (Stage.SHADOW, Stage.PRIMARY, Stage.METER)

ResolutionReason = Literal["kill", "override", "schedule", "rollout", "default", "safe"]
"""Which rule decided a customer's stage (``safe``: Redis could not be read)."""


class CustomerBilling(BaseModel):
    """What stage resolution must know of a customer's Stripe subscription, recorded by cutovers.

    ``test_clock``: the Stripe test clock the subscription lives on; its period ends (and so its
    schedule entries) are judged by the clock's ``frozen_time``, not the process clock.
    ``price_move_at``: when a cutover's Stripe schedule moves its legacy item to the meter-backed
    price; from then on Stripe refuses its usage records, so the kill switch holds it at
    ``primary`` instead of sending it to ``legacy``.
    """

    model_config = ConfigDict(frozen=True)

    test_clock: str | None = None
    price_move_at: int | None = None


class FlagSnapshot(BaseModel):
    """Everything stage resolution needs for one customer, read from Redis in one round trip.

    Values that were not valid in Redis (edited by hand) are already dropped: they read as absent.
    """

    model_config = ConfigDict(frozen=True)

    customer: str
    kill: bool = False
    default: Stage = Stage.LEGACY
    rollout: dict[Stage, float] = Field(default_factory=dict)
    """Percent of customers (0 to 100, two decimals) in each rollout stage; a missing stage is 0."""
    override: Stage | None = None
    schedule: tuple[tuple[int, Stage], ...] = ()
    """``(at, stage)`` pairs, sorted by ``at``: the customer is at ``stage`` from time ``at``."""
    billing: CustomerBilling = Field(default_factory=CustomerBilling)
    """The customer's test clock and price move, if any (``CustomerBilling``)."""


class Resolution(BaseModel):
    """A customer's resolved stage, the rule that decided it, and how long it holds at most."""

    model_config = ConfigDict(frozen=True)

    stage: Stage
    reason: ResolutionReason
    detail: str
    valid_until: float | None = None
    """Unix time of the customer's next scheduled change, if any: the result may change then."""


class AuditEntry(BaseModel):
    """One flag change as recorded in the audit stream: who, when, what, old and new value, why."""

    model_config = ConfigDict(frozen=True)

    id: str
    """The audit stream entry id (orders entries)."""
    at: float
    """Unix time of the change (the store's clock)."""
    actor: str
    action: str
    """``set_default``, ``set_override``, ``remove_override``, ``set_rollout:<stage>``,
    ``schedule``, ``clear_schedule``, ``set_kill`` or ``set_billing``."""
    customer: str
    """The customer concerned, or ``*`` for a global change."""
    old: str | None
    """The stored value before the change (``None``: unset)."""
    new: str | None
    """The stored value after the change (``None``: unset)."""
    reason: str = ""
