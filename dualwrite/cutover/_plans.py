"""The flag changes each cutover operation makes, worked out from the flags as read (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dualwrite.cutover._cohorts import CutoverInputError, previous_stage
from dualwrite.cutover._models import FlagChange
from dualwrite.flags import ROLLOUT_STAGES, FlagSnapshot
from dualwrite.models import Stage, utc_time

__all__ = [
    "check_rollout",
    "clear_schedule_change",
    "cutover_changes",
    "due_stage",
    "override_change",
    "plan_rollback",
    "plan_rollback_all",
    "reason_text",
    "refuse",
    "rollout_change",
    "schedule_text",
]


def plan_rollback_all(
    to: Stage,
    *,
    rollout: Mapping[Stage, float],
    default: Stage,
    overrides: Mapping[str, Stage],
    schedules: Mapping[str, Sequence[tuple[int, Stage]]],
    now: float,
    nows: Mapping[str, float] | None = None,
    floors: Mapping[str, Stage] | None = None,
) -> list[FlagChange]:
    """The changes that bring everyone back to ``to`` at most (``CutoverOps.rollback_all``);
    a customer in ``floors`` goes no lower than its floor; ``nows`` gives customers on a Stripe
    test clock their own now (others: ``now``)."""
    nows = nows or {}
    floors = floors or {}
    changes: list[FlagChange] = []
    kept = max((rollout.get(s, 0.0) for s in ROLLOUT_STAGES if s.rank >= to.rank), default=0.0)
    if to in ROLLOUT_STAGES and kept > rollout.get(to, 0.0):
        old = rollout.get(to, 0.0)
        changes.append(rollout_change(to, old, kept))
    for stage in ROLLOUT_STAGES:
        if stage.rank > to.rank and rollout.get(stage, 0.0) > 0:
            changes.append(rollout_change(stage, rollout[stage], 0.0))
    if default.rank > to.rank:
        changes.append(FlagChange(kind="default", customer="*", old=default.value, new=to.value))
    for customer, stage in sorted(overrides.items()):
        target = _floored(to, floors.get(customer))
        if stage.rank > target.rank:
            changes.append(override_change(customer, stage, target, stage))
    for customer, entries in sorted(schedules.items()):
        target = _floored(to, floors.get(customer))
        if not any(stage.rank > target.rank for _, stage in entries):
            continue
        current = due_stage(entries, nows.get(customer, now))
        if customer not in overrides and current is not None:
            pinned = current if current.rank <= target.rank else target
            changes.append(override_change(customer, None, pinned, current))
        changes.append(clear_schedule_change(customer, entries))
    return changes


def due_stage(entries: Sequence[tuple[int, Stage]], now: float) -> Stage | None:
    """The stage of the latest schedule entry due at ``now`` (entries sorted by time), if any."""
    due = [stage for at, stage in entries if at <= now]
    return due[-1] if due else None


def _floored(to: Stage, floor: Stage | None) -> Stage:
    """``to``, or ``floor`` when that is further forward."""
    return floor if floor is not None and floor.rank > to.rank else to


def check_rollout(
    stage: Stage, percent: float, rollout: Mapping[Stage, float], default: Stage, *, force: bool
) -> None:
    """Refuse lowering a percentage, or a percentage that would move customers more than one
    stage forward (the previous stage's rollout must cover it), unless ``force``."""
    old = rollout.get(stage, 0.0)
    if percent < old and not force:
        msg = (
            f"a percentage rollout only adds customers: {stage.value} is at {old:g}%, and "
            f"{percent:g}% would move some back; use `dualwrite rollback --all --to "
            f"{previous_stage(stage).value}` or --force"
        )
        raise CutoverInputError(msg)
    before = previous_stage(stage)
    feeder = max(
        (rollout.get(s, 0.0) for s in ROLLOUT_STAGES if s.rank >= before.rank), default=0.0
    )
    if not force and before is not Stage.LEGACY and default.rank < before.rank and percent > feeder:
        msg = (
            f"{percent:g}% to {stage.value} would take customers straight from "
            f"{default.value} (only {feeder:g}% are at {before.value} or beyond); raise "
            f"{before.value} to {percent:g}% first, or --force"
        )
        raise CutoverInputError(msg)


def plan_rollback(
    customer: str, current: Stage, snapshot: FlagSnapshot, target: Stage
) -> list[FlagChange]:
    """Pin ``customer`` to ``target`` and clear its schedule (the override first); empty when it
    is already there with nothing scheduled."""
    changes: list[FlagChange] = []
    if snapshot.override is not target and (current is not target or snapshot.schedule):
        changes.append(override_change(customer, snapshot.override, target, current))
    if snapshot.schedule:
        changes.append(clear_schedule_change(customer, snapshot.schedule, current, target))
    return changes


def reason_text(what: str, reason: str) -> str:
    """The audit reason: what the operation does, then the person's reason."""
    return f"{what}: {reason}" if reason else what


def refuse(problems: list[str]) -> None:
    """Raise one ``CutoverInputError`` naming the first problems, if there are any."""
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        msg = "; ".join(problems[:3]) + more + "; nothing was changed"
        raise CutoverInputError(msg)


def schedule_text(entries: Sequence[tuple[int, Stage]]) -> str:
    """A schedule as text: ``primary@1764547200, …``."""
    return ", ".join(f"{stage.value}@{utc_time(at)}" for at, stage in entries)


def override_change(customer: str, old: Stage | None, stage: Stage, current: Stage) -> FlagChange:
    """Pin ``customer`` (at ``current``, overridden to ``old`` if at all) to ``stage``."""
    return FlagChange(
        kind="set_override",
        customer=customer,
        old=old.value if old else None,
        new=stage.value,
        stage_before=current,
        stage_after=stage,
    )


def clear_schedule_change(
    customer: str,
    entries: Sequence[tuple[int, Stage]],
    current: Stage | None = None,
    after: Stage | None = None,
) -> FlagChange:
    """Clear ``customer``'s schedule ``entries`` (stages before and after, when known)."""
    return FlagChange(
        kind="clear_schedule",
        customer=customer,
        old=schedule_text(entries),
        new=None,
        stage_before=current,
        stage_after=after,
    )


def _schedule_change(
    customer: str, old: str | None, stage: Stage, at: int, current: Stage
) -> FlagChange:
    """A schedule entry moving ``customer`` from ``current`` to ``stage`` at ``at``."""
    return FlagChange(
        kind="schedule",
        customer=customer,
        old=old,
        new=stage.value,
        at=at,
        stage_before=current,
        stage_after=stage,
    )


def rollout_change(stage: Stage, old: float, new: float) -> FlagChange:
    """Set ``stage``'s percentage rollout from ``old`` to ``new``."""
    return FlagChange(
        kind="rollout", customer="*", old=f"{stage.value} {old:g}%", new=f"{stage.value} {new:g}%"
    )


def cutover_changes(
    customer: str, snapshot: FlagSnapshot, current: Stage, stage: Stage, when: int, now: int
) -> list[FlagChange]:
    """The schedule entries (and the override's removal) that move ``customer`` at ``when``."""
    changes: list[FlagChange] = []
    old = schedule_text(snapshot.schedule) or None
    if snapshot.override is not None:
        if when > now:
            # Keep the current stage until the instant: a schedule entry from now replaces the pin.
            changes.append(_schedule_change(customer, old, current, now, current))
        changes.append(
            FlagChange(
                kind="remove_override",
                customer=customer,
                old=snapshot.override.value,
                new=None,
                stage_before=current,
                stage_after=current if when > now else stage,
            )
        )
    changes.append(_schedule_change(customer, old, stage, when, current))
    # The schedule entry for the target goes in before the override leaves when it is due now.
    return changes if when > now else changes[-1:] + changes[:-1]
