"""Rollbacks: named customers, everyone (``--all``), every rollout one stage back (the guard's
global rollback), and the kill switch with the cancellation of pending cutovers.

The rules every one of them keeps:

* one stage back at a time, unless ``force`` (the kill switch is the one lever that puts everyone
  on legacy at once);
* no customer is left at a stage whose authoritative leg Stripe refuses for its item: a customer
  whose item already moved to its meter-backed price stops at ``primary``, and a pending cutover's
  Stripe schedule is released before the customer goes back, so the price does not move under it
  (``_prices``);
* the guard's global rollback and the kill switch cancel pending cutovers (flag schedule entries
  still in the future, and their Stripe schedules), so no schedule later moves a customer that was
  sent back forward again, past a stage.

Stripe goes first for named and ``--all`` rollbacks: every read and release is made before a flag
changes, so a refusal from Stripe changes no flag. The kill switch goes on first (it is the
emergency lever) and a release Stripe refuses is reported in the notes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dualwrite.cutover._apply import apply_change, finish
from dualwrite.cutover._cohorts import CutoverInputError, next_stage, previous_stage
from dualwrite.cutover._models import FlagChange, OperationResult, StripeCall
from dualwrite.cutover._plans import (
    clear_schedule_change,
    due_stage,
    override_change,
    plan_rollback,
    plan_rollback_all,
    reason_text,
    refuse,
    rollout_change,
)
from dualwrite.cutover._prices import (
    SAFE_STAGE,
    ItemChecks,
    crosses_price_move,
    pending_cutover,
)
from dualwrite.cutover._stripe import CutoverStripeError
from dualwrite.flags import ROLLOUT_STAGES
from dualwrite.models import Stage

if TYPE_CHECKING:
    # The protocol CutoverOps satisfies: importing _ops here would close an import circle.
    from dualwrite.cutover._context import CutoverContext as CutoverOps

__all__ = ["cancel_pending", "kill", "rollback_all", "rollback_customers", "step_back_all"]

Schedule = Sequence[tuple[int, Stage]]


@dataclass(slots=True)
class _Protection:
    """What Stripe said about the customers a rollback takes below ``primary``."""

    floors: dict[str, Stage] = field(default_factory=dict)
    releases: list[tuple[str, StripeCall]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    async def release(
        self, checks: ItemChecks, ops: CutoverOps, *, dry_run: bool, actor: str, reason: str
    ) -> list[StripeCall]:
        """Release the pending cutovers' schedules (on a dry run: the calls it would make), and
        forget their price moves."""
        if dry_run:
            return [call for _, call in self.releases]
        made: list[StripeCall] = []
        for customer, call in self.releases:
            made.append(await checks.release(customer, call))
            await ops.forget_price_move(customer, actor=actor, reason=reason)
        return made


async def _protect(
    checks: ItemChecks,
    moves: Sequence[tuple[str, Stage, Schedule, Stage]],
    *,
    nows: Mapping[str, int],
) -> _Protection:
    """Check each ``(customer, stage now, schedule, stage after)`` that crosses a price move
    (``nows``: each customer's own now, its test clock's when it lives on one)."""
    found = _Protection()
    for customer, current, schedule, after in moves:
        if not crosses_price_move(current, schedule, after, nows[customer]):
            continue
        check = await checks.check(customer)
        if check.foreign is not None:
            found.problems.append(check.foreign_problem())
        elif check.moved_to is not None and current.rank >= SAFE_STAGE.rank:
            found.floors[customer] = SAFE_STAGE
            found.notes.append(check.held_note(after))
        elif check.release is not None:
            found.releases.append((customer, check.release))
            found.notes.append(check.released_note())
    return found


def _check_back(customer: str, current: Stage, target: Stage, *, force: bool) -> None:
    """Refuse a rollback forward, or more than one stage back without ``force``."""
    if target.rank > current.rank:
        msg = (
            f"{customer} is at {current.value}: {target.value} is forward, not back; "
            f"use `dualwrite cutover {customer} --to {target.value}`"
        )
        raise CutoverInputError(msg)
    if current.rank - target.rank > 1 and not force:
        step = previous_stage(current)
        msg = (
            f"{customer} is at {current.value}: rollbacks go one stage at a time (back: "
            f"{step.value}); roll it back to {step.value} first, or to {target.value} with --force"
        )
        raise CutoverInputError(msg)


async def rollback_customers(
    ops: CutoverOps,
    customers: Sequence[str],
    *,
    to: Stage | None,
    actor: str,
    reason: str,
    force: bool,
    dry_run: bool,
    operation: str,
) -> OperationResult:
    """``CutoverOps.rollback``: each customer one stage back (or to ``to``), pinned by override,
    its schedule cleared; held at ``primary`` when its item left the legacy price."""
    why = reason_text(f"{operation} to {to.value if to else 'the previous stage'}", reason)
    nows = await ops.nows(customers)
    states = {customer: await ops.stage_of(customer) for customer in customers}
    targets: dict[str, Stage] = {}
    problems: list[str] = []
    for customer, (current, _) in states.items():
        target = to or previous_stage(current)
        try:
            _check_back(customer, current, target, force=force)
        except CutoverInputError as exc:
            problems.append(str(exc))
            continue
        targets[customer] = target
    refuse(problems)
    moves = [(c, states[c][0], states[c][1].schedule, target) for c, target in targets.items()]
    checks = ops.item_checks(operation)
    try:
        found = await _protect(checks, moves, nows=nows)
        refuse(found.problems)
        calls = await found.release(checks, ops, dry_run=dry_run, actor=actor, reason=why)
    finally:
        await checks.aclose()
    plans: list[FlagChange] = []
    unchanged: list[str] = []
    for customer, target in targets.items():
        current, snapshot = states[customer]
        planned = plan_rollback(customer, current, snapshot, found.floors.get(customer, target))
        plans += planned
        if not planned:
            unchanged.append(f"{customer} is already {current.value}")
    # The override first: the customer never resolves through its schedule's stage again.
    plans.sort(key=lambda c: c.kind != "set_override")
    result = await finish(
        ops.store,
        "rollback",
        plans,
        actor=actor,
        reason=why,
        dry_run=dry_run,
        unchanged=unchanged,
        stripe_calls=calls,
        kill_note=False,
    )
    return result.model_copy(update={"notes": found.notes, "held": found.floors})


def _multi_stage(
    changes: Sequence[FlagChange], rollout: dict[Stage, float], default: Stage, to: Stage
) -> list[str]:
    """What ``rollback --all --to to`` would move more than one stage at once."""
    moved = [
        f"rollout {stage.value} {rollout[stage]:g}%"
        for stage in ROLLOUT_STAGES
        if stage.rank > to.rank + 1 and rollout.get(stage, 0.0) > 0
    ]
    if default.rank > to.rank + 1:
        moved.append(f"the default ({default.value})")
    for change in changes:
        before, after = change.stage_before, change.stage_after
        if before is not None and after is not None and before.rank - after.rank > 1:
            moved.append(f"{change.customer} ({before.value})")
    return moved


async def rollback_all(
    ops: CutoverOps, *, to: Stage, actor: str, reason: str, force: bool, dry_run: bool
) -> OperationResult:
    """``CutoverOps.rollback_all``: everyone back to ``to`` at most, one stage unless ``force``."""
    why = reason_text(f"rollback --all to {to.value}", reason)
    now = ops.now()
    store = ops.store
    rollout, default = await store.get_rollout(), await store.get_default()
    overrides, schedules = await store.overrides(), await store.schedules()
    nows = await ops.nows(sorted({*overrides, *schedules}))
    moves: list[tuple[str, Stage, Schedule, Stage]] = []
    for customer in sorted({*overrides, *schedules}):
        entries = schedules.get(customer, [])
        current = overrides.get(customer) or due_stage(entries, nows[customer]) or Stage.LEGACY
        moves.append((customer, current, entries, to))
    checks = ops.item_checks("rollback --all")
    try:
        found = await _protect(checks, moves, nows=nows)
        refuse(found.problems)
        changes = plan_rollback_all(
            to,
            rollout=rollout,
            default=default,
            overrides=overrides,
            schedules=schedules,
            now=now,
            nows=nows,
            floors=found.floors,
        )
        moved = _multi_stage(changes, rollout, default, to)
        if moved and not force:
            listed = ", ".join(moved[:3]) + (
                f" and {len(moved) - 3} more" if len(moved) > 3 else ""
            )
            msg = (
                f"rollback --all --to {to.value} would move {listed} more than one stage at once; "
                f"roll everyone back with --to {(next_stage(to) or to).value} first, or use --force "
                "(or the kill switch: `dualwrite flags kill on`)"
            )
            refuse([msg])
        calls = await found.release(checks, ops, dry_run=dry_run, actor=actor, reason=why)
    finally:
        await checks.aclose()
    result = await finish(
        store,
        "rollback",
        changes,
        actor=actor,
        reason=why,
        dry_run=dry_run,
        unchanged=[] if changes else [f"nothing is beyond {to.value}"],
        stripe_calls=calls,
    )
    return result.model_copy(update={"notes": [*found.notes, *result.notes], "held": found.floors})


async def cancel_pending(
    ops: CutoverOps, *, kill_on: bool, dry_run: bool, actor: str, reason: str
) -> tuple[list[FlagChange], list[StripeCall], list[str]]:
    """Cancel every pending cutover: the flag changes to make, the Stripe releases made (planned on
    a dry run), and notes. A customer with due entries is pinned at its current scheduled stage,
    then its schedule is cleared. Stripe refusing (or no key) does not stop it: a customer whose
    schedule could not be released keeps its pending cutover (so stage and price still move
    together), and a note says so."""
    overrides, schedules = await ops.store.overrides(), await ops.store.schedules()
    nows = await ops.nows(schedules)  # a customer on a test clock: the clock's time
    pending = {
        c: entries for c, entries in schedules.items() if any(at > nows[c] for at, _ in entries)
    }
    calls: list[StripeCall] = []
    notes: list[str] = []
    kept: set[str] = set()
    checks = ops.item_checks("cancelling a pending cutover")
    try:
        for customer, entries in sorted(pending.items()):
            now = nows[customer]
            after = overrides.get(customer) or due_stage(entries, now) or Stage.LEGACY
            if kill_on:
                after = Stage.LEGACY
            if not pending_cutover(entries, now) or after.rank >= SAFE_STAGE.rank:
                continue
            try:
                check = await checks.check(customer)
                if check.release is not None:
                    made = check.release
                    if not dry_run:
                        made = await checks.release(customer, check.release)
                        await ops.forget_price_move(customer, actor=actor, reason=reason)
                    calls.append(made)
                    notes.append(check.released_note())
                elif check.foreign is not None:
                    kept.add(customer)
                    notes.append(f"{check.foreign_problem()}; its pending cutover is kept")
            except (CutoverInputError, CutoverStripeError) as exc:
                kept.add(customer)
                notes.append(
                    f"{customer} keeps its pending cutover: its Stripe schedule could not be "
                    f"checked or released ({exc}); release it in Stripe, then cancel it"
                )
    finally:
        await checks.aclose()
    changes: list[FlagChange] = []
    for customer, entries in sorted(pending.items()):
        if customer in kept:
            continue
        due = due_stage(entries, nows[customer])
        if customer not in overrides and due is not None:
            changes.append(override_change(customer, None, due, due))
        changes.append(clear_schedule_change(customer, entries))
    if changes:
        notes.insert(0, f"pending cutovers cancelled for {len(pending) - len(kept)} customer(s)")
    return changes, calls, notes


async def step_back_all(
    ops: CutoverOps, *, actor: str, reason: str, dry_run: bool
) -> OperationResult:
    """Every percentage rollout and the default one stage back, pending cutovers cancelled (the
    guard's global rollback). Each rollout takes the next stage's percentage (meter's goes to 0):
    rollout buckets are nested, so every customer a rollout placed moves back exactly one stage.
    Customers pinned by override or a due schedule entry stay (the per-customer check judges
    them)."""
    store = ops.store
    rollout, default = await store.get_rollout(), await store.get_default()
    changes: list[FlagChange] = []
    for index, stage in enumerate(ROLLOUT_STAGES):
        later = ROLLOUT_STAGES[index + 1] if index + 1 < len(ROLLOUT_STAGES) else None
        new = rollout.get(later, 0.0) if later is not None else 0.0
        if new != rollout.get(stage, 0.0):
            changes.append(rollout_change(stage, rollout.get(stage, 0.0), new))
    if default is not Stage.LEGACY:
        back = previous_stage(default)
        changes.append(FlagChange(kind="default", customer="*", old=default.value, new=back.value))
    cancelled, calls, notes = await cancel_pending(
        ops, kill_on=False, dry_run=dry_run, actor=actor, reason=reason
    )
    result = await finish(
        store,
        "rollback",
        changes + cancelled,
        actor=actor,
        reason=reason,
        dry_run=dry_run,
        stripe_calls=calls,
    )
    return result.model_copy(update={"notes": [*notes, *result.notes]})


async def kill(ops: CutoverOps, *, actor: str, reason: str, dry_run: bool) -> OperationResult:
    """The kill switch on (every customer legacy at once), then every pending cutover cancelled
    (its Stripe schedule released), so nothing moves forward when the switch goes off."""
    store = ops.store
    on = await store.get_kill()
    change = FlagChange(kind="kill", customer="*", old="on" if on else "off", new="on")
    if not on and not dry_run:
        await apply_change(store, change, actor=actor, reason=reason)
    cancelled, calls, notes = await cancel_pending(
        ops, kill_on=True, dry_run=dry_run, actor=actor, reason=reason
    )
    result = await finish(
        store,
        "rollback",
        cancelled,
        actor=actor,
        reason=reason,
        dry_run=dry_run,
        unchanged=["the kill switch is already on"] if on else [],
        stripe_calls=calls,
        kill_note=False,
    )
    return result.model_copy(
        update={"changes": ([] if on else [change]) + cancelled, "notes": notes}
    )
