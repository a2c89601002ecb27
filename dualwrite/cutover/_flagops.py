"""The single-flag changes of ``dualwrite flags`` and the admin API, under the cutover rules.

``flags set`` and ``flags rollout`` are ``CutoverOps.move_customers`` and ``rollout_percent``;
the changes here are the rest: the default stage, removing an override, and one schedule entry.
Each moves customers at most one stage forward unless ``force`` (a move back is a rollback), a
schedule entry in the past is refused unless ``force``, and each has a dry run returning exactly
the change it would make, like every other operation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dualwrite.cutover._apply import finish
from dualwrite.cutover._cohorts import CutoverInputError, check_move
from dualwrite.cutover._models import FlagChange, OperationResult
from dualwrite.cutover._plans import reason_text, schedule_text
from dualwrite.flags import resolve_snapshot
from dualwrite.models import Stage, utc_time

if TYPE_CHECKING:
    from dualwrite.cutover._ops import CutoverOps

__all__ = ["clear_override", "schedule_stage", "set_default"]


def _unchanged(line: str, actor: str, reason: str, dry_run: bool) -> OperationResult:
    """A change that would change nothing, and why."""
    return OperationResult(
        operation="rollout", dry_run=dry_run, actor=actor, reason=reason, unchanged=[line]
    )


async def set_default(
    ops: CutoverOps,
    stage: Stage,
    *,
    actor: str,
    reason: str = "",
    force: bool = False,
    dry_run: bool = False,
) -> OperationResult:
    """Set the stage of every customer no other rule decides (one stage forward unless
    ``force``: a new default moves all of them at once)."""
    old = await ops.store.get_default()
    why = reason_text(f"default {stage.value}", reason)
    if old is stage:
        return _unchanged(f"the default is already {stage.value}", actor, why, dry_run)
    check_move("every customer on the default", old, stage, force=force)
    change = FlagChange(kind="default", customer="*", old=old.value, new=stage.value)
    return await finish(ops.store, "rollout", [change], actor=actor, reason=why, dry_run=dry_run)


async def clear_override(
    ops: CutoverOps,
    customer: str,
    *,
    actor: str,
    reason: str = "",
    force: bool = False,
    dry_run: bool = False,
) -> OperationResult:
    """Remove ``customer``'s override; refused (unless ``force``) when the stage it falls back to
    is more than one stage forward, or behind (a rollback's job)."""
    current, snapshot = await ops.stage_of(customer)
    why = reason_text(f"remove the override of {customer}", reason)
    if snapshot.override is None:
        return _unchanged(f"{customer} has no override", actor, why, dry_run)
    after = resolve_snapshot(
        customer,
        snapshot.model_copy(update={"override": None}),
        now=await ops.now_of(customer, snapshot.billing),
        salt=ops.settings.flags.rollout_salt,
    ).stage
    check_move(customer, current, after, force=force)
    change = FlagChange(
        kind="remove_override",
        customer=customer,
        old=snapshot.override.value,
        new=None,
        stage_before=current,
        stage_after=after,
    )
    return await finish(ops.store, "rollout", [change], actor=actor, reason=why, dry_run=dry_run)


async def schedule_stage(
    ops: CutoverOps,
    customer: str,
    stage: Stage,
    at: int | None,
    *,
    actor: str,
    reason: str = "",
    force: bool = False,
    dry_run: bool = False,
) -> OperationResult:
    """Add one schedule entry: ``customer`` at ``stage`` from ``at`` on (``None``: from now).

    Refused unless ``force``: ``at`` already past (it would apply at once, unannounced; give
    ``None``, the CLI's ``--at now``, for that), or ``stage`` more than one stage forward (or back)
    from the stage the customer resolves to just before ``at``.
    """
    # The customer's own now: on a Stripe test clock, the clock's frozen time.
    now = await ops.now_of(customer)
    if at is None:
        # Read here, not by the caller: "now" read earlier is already past under load.
        at = int(now)
    elif at < now and not force:
        msg = (
            f"--at {utc_time(at)} is in the past (now is {utc_time(now)}): the schedule would "
            "apply at once; use --at now to move it now, or --force"
        )
        raise CutoverInputError(msg)
    current, snapshot = await ops.stage_of(customer)
    salt = ops.settings.flags.rollout_salt
    before = resolve_snapshot(customer, snapshot, now=max(now, at - 1), salt=salt).stage
    check_move(customer, before, stage, force=force)
    notes = []
    if snapshot.override is not None:
        notes.append(
            f"{customer} has an override ({snapshot.override.value}), which beats schedules: "
            f"remove it (`dualwrite flags set {customer} --clear`) or use `dualwrite cutover`"
        )
    change = FlagChange(
        kind="schedule",
        customer=customer,
        old=schedule_text(snapshot.schedule) or None,
        new=stage.value,
        at=at,
        stage_before=current,
        stage_after=stage,
    )
    why = reason_text(f"schedule {customer} {stage.value} at {utc_time(at)}", reason)
    result = await finish(ops.store, "cutover", [change], actor=actor, reason=why, dry_run=dry_run)
    return result.model_copy(update={"notes": [*notes, *result.notes]})
