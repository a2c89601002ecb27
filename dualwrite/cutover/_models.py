"""What the cutover operations return: the flag changes and Stripe calls made (or planned)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dualwrite.models import Stage

__all__ = [
    "ChangeKind",
    "CustomerTrip",
    "FlagChange",
    "GuardResult",
    "OperationResult",
    "StripeCall",
]

ChangeKind = Literal[
    "set_override", "remove_override", "schedule", "clear_schedule", "rollout", "default", "kill"
]
"""Which flag a change touches (``RedisFlagStore``'s setters)."""


class FlagChange(BaseModel):
    """One flag change, made or (on a dry run) planned."""

    model_config = ConfigDict(frozen=True)

    kind: ChangeKind
    customer: str
    """The customer, or ``*`` for a global flag."""
    old: str | None
    new: str | None
    at: int | None = None
    """For a schedule: the Unix time the new stage starts."""
    stage_before: Stage | None = None
    """The customer's resolved stage before the change (customer changes only)."""
    stage_after: Stage | None = None
    """The customer's resolved stage once the change applies (at ``at`` for a schedule)."""

    def describe(self) -> str:
        """One line for people."""
        what = f"{self.kind} {self.customer}: {self.old or '-'} -> {self.new or '-'}"
        if self.stage_before is not None and self.stage_after is not None:
            what += f" (stage {self.stage_before.value} -> {self.stage_after.value})"
        return what


class StripeCall(BaseModel):
    """One Stripe API call, made or (on a dry run) planned, as sent (form parameters flattened)."""

    model_config = ConfigDict(frozen=True)

    method: Literal["GET", "POST"]
    path: str
    params: dict[str, Any] = Field(default_factory=dict)
    stripe_version: str | None = None
    idempotency_key: str | None = None
    result_id: str | None = None
    """The id of the object Stripe returned (made calls only)."""

    def describe(self) -> str:
        """One line for people: ``POST /v1/subscription_schedules from_subscription=sub_…``."""
        params = " ".join(f"{key}={value}" for key, value in _flat(self.params))
        return f"{self.method} {self.path} {params}".rstrip()


def _flat(params: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, dict):
            pairs += _flat(value, name)
        elif isinstance(value, list):
            for index, entry in enumerate(value):
                if isinstance(entry, dict):
                    pairs += _flat(entry, f"{name}[{index}]")
                else:
                    pairs.append((f"{name}[{index}]", entry))
        else:
            pairs.append((name, value))
    return pairs


class OperationResult(BaseModel):
    """What one rollout, cutover or rollback changed (or would change, when ``dry_run``)."""

    model_config = ConfigDict(frozen=True)

    operation: Literal["rollout", "cutover", "rollback", "guard"]
    dry_run: bool
    actor: str
    reason: str
    changes: list[FlagChange] = Field(default_factory=list)
    stripe_calls: list[StripeCall] = Field(default_factory=list)
    unchanged: list[str] = Field(default_factory=list)
    """Customers (or flags) already where the operation would put them, and why."""
    notes: list[str] = Field(default_factory=list)
    held: dict[str, Stage] = Field(default_factory=dict)
    """Customers a rollback stopped short of where it was asked to take them, and where: the last
    stage whose authoritative leg Stripe accepts for their item (``primary``)."""


class CustomerTrip(BaseModel):
    """A customer the guard found over a threshold, and what it did about it."""

    model_config = ConfigDict(frozen=True)

    customer: str
    stage: Stage
    rolled_back_to: Stage
    divergent_events: int
    difference_pct: float | None
    reason: str
    held: str = ""
    """Why the customer stayed where it is instead (empty: it went to ``rolled_back_to``)."""


class GuardResult(BaseModel):
    """One guard pass: who was checked, who tripped, and the flag changes made."""

    model_config = ConfigDict(frozen=True)

    checked: int
    """Customers past ``legacy`` judged: on a full pass every one with ledger rows in the window,
    otherwise those whose rows changed since the previous pass."""
    full: bool = True
    """Whether this was a full pass (``Guard``: the first, then hourly and after a flags or
    guardrails change) rather than one over the changed customers only."""
    tripped: list[CustomerTrip] = Field(default_factory=list)
    global_tripped: bool = False
    divergent_share_pct: float = 0.0
    dry_run: bool = False
    actions: list[OperationResult] = Field(default_factory=list)
