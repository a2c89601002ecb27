"""The migration's progress: how many customers were at each stage at the end of each day,
replayed from the flag audit log.

The flags as they are now are the starting point; walking the audit log from the newest entry
back, each change is undone (its field set back to its ``old`` value), and at each day's end the
flags of that moment resolve every customer (``resolve_snapshot``, the rule the request path
uses). Days older than the audit log reaches (it is capped) are not shown as if they were known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dualwrite.flags import AuditEntry, FlagSnapshot, RedisFlagStore, resolve_snapshot
from dualwrite.flags._codec import (
    DEFAULT_FIELD,
    KILL_FIELD,
    encode_schedule,
    format_percent,
    parse_kill,
    parse_rollout,
    parse_schedule,
    parse_stored_stage,
    rollout_field,
)
from dualwrite.models import Stage, utc_day

__all__ = ["DAY", "ProgressDay", "migration_progress"]

DAY = 86_400
#: The audit entries read back (the log is capped too: ``RedisFlagStore``'s ``audit_maxlen``).
HISTORY_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class ProgressDay:
    """Customers per stage at the end of one UTC day (``known``: the audit log reaches back)."""

    day: str
    counts: dict[str, int]
    known: bool = True

    @property
    def total(self) -> int:
        """Customers counted that day."""
        return sum(self.counts.values())

    def share(self, stage: str) -> float:
        """``stage``'s percentage of the customers counted."""
        return 100.0 * self.counts.get(stage, 0) / self.total if self.total else 0.0


@dataclass
class _Flags:
    """The flags in their stored (text) form, changed back entry by entry."""

    config: dict[str, str]
    overrides: dict[str, str]
    schedules: dict[str, str]

    def undo(self, entry: AuditEntry) -> None:
        target = self._target(entry)
        if target is None:
            return
        table, key = target
        if entry.old:
            table[key] = entry.old
        else:
            table.pop(key, None)

    def _target(self, entry: AuditEntry) -> tuple[dict[str, str], str] | None:
        action = entry.action
        if action == "set_default":
            return self.config, DEFAULT_FIELD
        if action == "set_kill":
            return self.config, KILL_FIELD
        if action.startswith("set_rollout:"):
            return self.config, action.removeprefix("set_")
        if action in ("set_override", "remove_override"):
            return self.overrides, entry.customer
        if action in ("schedule", "clear_schedule"):
            return self.schedules, entry.customer
        return None

    def snapshot(self, customer: str) -> FlagSnapshot:
        def quiet(message: str) -> None:
            """Unreadable values read as absent, as on the request path (warned there)."""

        return FlagSnapshot(
            customer=customer,
            kill=parse_kill(self.config.get(KILL_FIELD), quiet),
            default=parse_stored_stage(self.config.get(DEFAULT_FIELD), "default", quiet)
            or Stage.LEGACY,
            rollout=parse_rollout(self.config, quiet),
            override=parse_stored_stage(self.overrides.get(customer), customer, quiet),
            schedule=parse_schedule(self.schedules.get(customer), customer, quiet),
        )


async def _current(store: RedisFlagStore) -> _Flags:
    rollout = await store.get_rollout()
    config = {DEFAULT_FIELD: (await store.get_default()).value}
    config[KILL_FIELD] = "1" if await store.get_kill() else "0"
    for stage, percent in rollout.items():
        config[rollout_field(stage)] = format_percent(stage, percent)
    return _Flags(
        config=config,
        overrides={customer: stage.value for customer, stage in (await store.overrides()).items()},
        schedules={
            customer: encode_schedule(dict(entries))
            for customer, entries in (await store.schedules()).items()
        },
    )


async def migration_progress(
    store: RedisFlagStore,
    customers: Sequence[str],
    *,
    now: float,
    salt: str,
    days: int = 14,
) -> list[ProgressDay]:
    """Customers per stage at the end of each of the last ``days`` UTC days, newest first (the
    first line is now)."""
    flags = await _current(store)
    history = await store.history(limit=HISTORY_LIMIT)
    complete = len(history) < HISTORY_LIMIT
    oldest = history[-1].at if history else now
    moments = [now] + [(int(now) // DAY - back) * DAY - 1 for back in range(days - 1)]
    result: list[ProgressDay] = []
    pending = list(history)  # newest first
    for moment in moments:
        while pending and pending[0].at > moment:
            flags.undo(pending.pop(0))
        known = complete or moment >= oldest
        counts = dict.fromkeys((stage.value for stage in Stage), 0)
        if known:
            for customer in customers:
                stage = resolve_snapshot(
                    customer, flags.snapshot(customer), now=moment, salt=salt
                ).stage
                counts[stage.value] += 1
        label = "now" if moment == now else utc_day(int(moment))
        result.append(ProgressDay(day=label, counts=counts, known=known))
    return result
