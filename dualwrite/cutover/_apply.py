"""The steps every cutover operation shares: plan each customer, apply the changes, report them.

The operations in ``_ops`` plan every change first and refuse before changing anything
(``plan_each`` refuses the whole cohort when any customer is refused); ``finish`` then applies the
planned changes in order through ``RedisFlagStore`` (unless it is a dry run) and sums them up as an
``OperationResult``, with a note when the kill switch makes them moot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from dualwrite.cutover._cohorts import CutoverInputError
from dualwrite.cutover._models import FlagChange, OperationResult, StripeCall
from dualwrite.cutover._plans import refuse
from dualwrite.flags import FlagSnapshot, RedisFlagStore
from dualwrite.models import Stage

__all__ = [
    "CustomerPlan",
    "Operation",
    "apply_change",
    "finish",
    "kill_switch_notes",
    "plan_each",
]

Operation = Literal["rollout", "cutover", "rollback"]
#: One customer's changes, or why it stays as it is; raises ``CutoverInputError`` to refuse it.
CustomerPlan = Callable[[str, Stage, FlagSnapshot], list[FlagChange] | str]


async def plan_each(
    customers: Sequence[str],
    plan: CustomerPlan,
    *,
    stage_of: Callable[[str], Awaitable[tuple[Stage, FlagSnapshot]]],
) -> tuple[list[FlagChange], list[str]]:
    """Every customer's changes and what stays unchanged; refuses all when any is refused."""
    plans: list[FlagChange] = []
    unchanged: list[str] = []
    problems: list[str] = []
    for customer in customers:
        current, snapshot = await stage_of(customer)
        try:
            planned = plan(customer, current, snapshot)
        except CutoverInputError as exc:
            problems.append(str(exc))
            continue
        if isinstance(planned, str):
            unchanged.append(planned)
        else:
            plans += planned
    refuse(problems)
    return plans, unchanged


async def finish(
    store: RedisFlagStore,
    operation: Operation,
    changes: list[FlagChange],
    *,
    actor: str,
    reason: str,
    dry_run: bool,
    unchanged: list[str] | None = None,
    stripe_calls: list[StripeCall] | None = None,
    kill_note: bool = True,
) -> OperationResult:
    """Apply ``changes`` in order (unless ``dry_run``) and report them."""
    if not dry_run:
        for change in changes:
            await apply_change(store, change, actor=actor, reason=reason)
    return OperationResult(
        operation=operation,
        dry_run=dry_run,
        actor=actor,
        reason=reason,
        changes=changes,
        stripe_calls=stripe_calls or [],
        unchanged=unchanged or [],
        notes=await kill_switch_notes(store) if kill_note else [],
    )


async def apply_change(
    store: RedisFlagStore, change: FlagChange, *, actor: str, reason: str
) -> None:
    """Make one planned change through the flag store (atomic, audited, published)."""
    new = str(change.new)
    if change.kind == "set_override":
        await store.set_override(change.customer, Stage(new), actor=actor, reason=reason)
    elif change.kind == "remove_override":
        await store.set_override(change.customer, None, actor=actor, reason=reason)
    elif change.kind == "schedule":
        at = int(change.at or 0)
        await store.schedule(change.customer, Stage(new), at, actor=actor, reason=reason)
    elif change.kind == "clear_schedule":
        await store.clear_schedule(change.customer, actor=actor, reason=reason)
    elif change.kind == "rollout":
        name, _, percent = new.partition(" ")
        await store.set_rollout(Stage(name), float(percent.rstrip("%")), actor=actor, reason=reason)
    elif change.kind == "default":
        await store.set_default(Stage(new), actor=actor, reason=reason)
    else:
        await store.set_kill(new == "on", actor=actor, reason=reason)


async def kill_switch_notes(store: RedisFlagStore) -> list[str]:
    """A note for the result when the kill switch is on (the changes take effect once it is off)."""
    if await store.get_kill():
        return ["the kill switch is on: every customer resolves to legacy until it is off"]
    return []
