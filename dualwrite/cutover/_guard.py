"""``Guard``: sends diverging customers (or the whole rollout) back to the previous safe stage.

One pass builds the report (``dualwrite.report.build_report``: per-customer totals, status and
difference, from the ledger and the divergence log) over the last ``lookback_days``, and checks
every customer past ``legacy``:

* more than ``max_divergent_events`` divergent events (dead-lettered shadow writes, late refusals),
  or a difference between the legs above ``max_difference_pct`` once nothing is pending: the
  customer is rolled back one stage (``CutoverOps.rollback``: an override, its schedule cleared);
* more than ``max_divergent_share_pct`` of at least ``min_customers`` checked customers tripped:
  the whole rollout goes back (``global_action``: ``rollback`` moves every percentage rollout and
  the default one stage back, ``kill`` turns the kill switch on; both cancel pending cutovers).

Retired legacy writes (refused by Stripe because the item moved to its meter-backed price) are
neither divergent events nor a difference (the report counts them on the legacy side), so neither
rule fires on them. A customer whose item already left the legacy price is never sent below
``primary``: the rollback holds it there (``CustomerTrip.held`` says why, and a warning with
``event: dualwrite.guard.held`` is logged).

Every change is audited with actor ``dualwrite-guard`` and the reason, and logged as a structured
warning (``extra={"event": "dualwrite.guard.tripped", ...}``). A customer already rolled back (or
held) is remembered with its stage (``P:{flags}:guard``): it is not tripped again until someone
moves it forward, and then only by divergence newer than the rollback.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from dualwrite.config import GuardrailSettings, ReportSettings
from dualwrite.cutover._cohorts import CutoverInputError, previous_stage
from dualwrite.cutover._models import CustomerTrip, GuardResult, OperationResult
from dualwrite.cutover._stripe import CutoverStripeError
from dualwrite.engine import StageSource
from dualwrite.exceptions import DualwriteError
from dualwrite.instruments import count_guard_rollback
from dualwrite.ledger import Ledger
from dualwrite.models import Stage, utc_day
from dualwrite.redis_client import as_str, store_errors
from dualwrite.report import CustomerReport, build_report


@dataclass(frozen=True, slots=True)
class _Baseline:
    """What the guard last did to a customer: the stage it rolled it back to, and its counts."""

    stage: Stage
    divergent_events: int
    difference_pct: float | None


if TYPE_CHECKING:
    # The protocol CutoverOps satisfies: importing _ops here would close an import circle.
    from dualwrite.cutover._context import CutoverContext as CutoverOps

__all__ = ["GUARD_ACTOR", "Guard"]

logger = logging.getLogger("dualwrite.guard")

#: The actor of every change the guard makes, in the flag audit log.
GUARD_ACTOR = "dualwrite-guard"


class Guard:
    """Checks divergence against the guardrails and rolls back what crossed them.

    Args:
        ops: makes the rollbacks (and holds the flag store).
        ledger: the ledger and divergence log the report reads.
        resolver: resolves many customers' stages at once (``StageResolver``).
        settings: the thresholds.
        report: the report's readiness settings (passed through to ``build_report``).
        clock: Unix time.
    """

    def __init__(
        self,
        ops: CutoverOps,
        ledger: Ledger,
        resolver: StageSource,
        settings: GuardrailSettings,
        *,
        report: ReportSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ops = ops
        self._ledger = ledger
        self._resolver = resolver
        self._settings = settings
        self._report = report or ReportSettings()
        self._clock = clock

    def _trip_reason(self, line: CustomerReport, base: _Baseline | None) -> str | None:
        """Why ``line`` crossed a guardrail, counting only divergence newer than the guard's last
        rollback of it (None: it did not, or it still sits where the guard put it)."""
        if base is not None and line.stage.rank <= base.stage.rank:
            return None
        limits = self._settings
        reasons: list[str] = []
        divergent = line.divergent_events - (base.divergent_events if base else 0)
        if divergent > limits.max_divergent_events:
            new = " new" if base else ""
            reasons.append(f"{divergent}{new} divergent events > {limits.max_divergent_events}")
        pct = line.difference_pct
        moved = base is None or pct != base.difference_pct
        if (
            moved
            and line.status != "pending"
            and pct is not None
            and abs(pct) > limits.max_difference_pct
        ):
            reasons.append(f"legs differ by {abs(pct):g}% > {limits.max_difference_pct:g}%")
        return "; ".join(reasons) or None

    async def _baselines(self) -> dict[str, _Baseline]:
        async with store_errors("reading the guard's state"):
            raw = await self._ops.redis.hgetall(self._ops.keys.guard_state)
        found: dict[str, _Baseline] = {}
        for customer, text in dict(raw or {}).items():
            try:
                data = json.loads(str(as_str(text)))
                found[str(as_str(customer))] = _Baseline(
                    Stage(data["stage"]), int(data["divergent_events"]), data.get("difference_pct")
                )
            except (ValueError, KeyError, TypeError):
                logger.warning("guard state of %s is unreadable; ignoring it", as_str(customer))
        return found

    async def _remember(self, trip: CustomerTrip) -> None:
        state = {
            "stage": trip.rolled_back_to.value,
            "divergent_events": trip.divergent_events,
            "difference_pct": trip.difference_pct,
            "at": self._clock(),
        }
        async with store_errors("writing the guard's state"):
            await self._ops.redis.hset(self._ops.keys.guard_state, trip.customer, json.dumps(state))

    async def check(
        self, *, dry_run: bool = False, actor: str = GUARD_ACTOR, reason: str = ""
    ) -> GuardResult:
        """One pass: find the customers over a threshold and roll them (or everyone) back.

        ``actor`` and ``reason`` (a person running the pass) go to the audit log with each
        rollback's own reason."""
        note = f" ({reason})" if reason else ""
        now = self._clock()
        since = utc_day(int(now) - self._settings.lookback_days * 86_400)
        report = await build_report(
            self._ledger, self._resolver, since=since, settings=self._report, now=now
        )
        baselines = await self._baselines()
        checked = [line for line in report.customers if line.stage is not Stage.LEGACY]
        trips: list[CustomerTrip] = []
        for line in checked:
            why = self._trip_reason(line, baselines.get(line.customer))
            if why is not None:
                trips.append(
                    CustomerTrip(
                        customer=line.customer,
                        stage=line.stage,
                        rolled_back_to=previous_stage(line.stage),
                        divergent_events=line.divergent_events,
                        difference_pct=line.difference_pct,
                        reason=why,
                    )
                )
        share = round(len(trips) * 100 / len(checked), 2) if checked else 0.0
        global_trip = (
            len(checked) >= self._settings.min_customers
            and share > self._settings.max_divergent_share_pct
        )
        actions: list[OperationResult] = []
        if global_trip:
            actions.append(
                await self._global(
                    share, len(trips), len(checked), dry_run=dry_run, actor=actor, note=note
                )
            )
        done: list[CustomerTrip] = []
        for trip in trips:
            try:
                result = await self._ops.rollback(
                    [trip.customer],
                    to=trip.rolled_back_to,
                    actor=actor,
                    reason=f"guardrail crossed: {trip.reason}{note}",
                    dry_run=dry_run,
                    operation="guard rollback",
                )
            except (CutoverInputError, CutoverStripeError) as exc:
                # Moved by someone else since the report, or Stripe could not say whether its
                # item left the legacy price: left where it is, tried again next pass.
                logger.warning("guard: %s not rolled back: %s", trip.customer, exc)
                done.append(
                    trip.model_copy(update={"rolled_back_to": trip.stage, "held": str(exc)})
                )
                continue
            held = result.held.get(trip.customer)
            if held is not None:
                trip = trip.model_copy(
                    update={"rolled_back_to": held, "held": "; ".join(result.notes)}
                )
            done.append(trip)
            actions.append(result)
            if dry_run:
                continue
            await self._remember(trip)
            if held is not None:
                logger.warning(
                    "guard: %s crossed a guardrail (%s) but stays at %s: %s",
                    trip.customer,
                    trip.reason,
                    held.value,
                    trip.held,
                    extra={
                        "event": "dualwrite.guard.held",
                        "customer": trip.customer,
                        "stage": held.value,
                        "reason": trip.reason,
                    },
                )
            elif result.changes:
                count_guard_rollback("customer")
                logger.warning(
                    "guard: %s rolled back from %s to %s (%s)",
                    trip.customer,
                    trip.stage.value,
                    trip.rolled_back_to.value,
                    trip.reason,
                    extra={
                        "event": "dualwrite.guard.tripped",
                        "scope": "customer",
                        "customer": trip.customer,
                        "from_stage": trip.stage.value,
                        "to_stage": trip.rolled_back_to.value,
                        "divergent_events": trip.divergent_events,
                        "difference_pct": trip.difference_pct,
                        "reason": trip.reason,
                    },
                )
        return GuardResult(
            checked=len(checked),
            tripped=done,
            global_tripped=global_trip,
            divergent_share_pct=share,
            dry_run=dry_run,
            actions=actions,
        )

    async def _global(
        self, share: float, tripped: int, checked: int, *, dry_run: bool, actor: str, note: str
    ) -> OperationResult:
        limit = self._settings.max_divergent_share_pct
        reason = f"guardrail crossed: {tripped} of {checked} customers diverged ({share:g}% > {limit:g}%)"
        if self._settings.global_action == "kill":
            result = await self._ops.kill(actor=actor, reason=reason + note, dry_run=dry_run)
        else:
            result = await self._ops.step_back_all(
                actor=actor, reason=reason + note, dry_run=dry_run
            )
        if result.changes and not dry_run:
            count_guard_rollback("global")
            logger.warning(
                "guard: %s; the rollout goes back (%s)",
                reason,
                self._settings.global_action,
                extra={
                    "event": "dualwrite.guard.tripped",
                    "scope": "global",
                    "action": self._settings.global_action,
                    "divergent_share_pct": share,
                    "tripped": tripped,
                    "checked": checked,
                    "reason": reason,
                },
            )
        return result

    async def run(
        self, *, interval: float | None = None, actor: str = GUARD_ACTOR, reason: str = ""
    ) -> None:
        """Check every ``interval`` seconds (default: the setting) until cancelled; a failed pass
        is logged and the next one runs on time. Of several processes running this, one passes
        per interval (a lease in Redis)."""
        every = interval or self._settings.interval_seconds
        if not math.isfinite(every) or every <= 0:
            msg = f"guard interval must be a positive number of seconds, got {every}"
            raise ValueError(msg)
        lease_ms = max(1, int(every * 900))  # a little under the interval: no pass is skipped
        while True:
            await anyio.sleep(every)  # not at start-up: a restarting worker acts on its schedule
            try:
                # Every worker runs the guard; one pass per interval is enough.
                async with store_errors("taking the guard lease"):
                    mine = await self._ops.redis.set(
                        self._ops.keys.guard_lease, "1", nx=True, px=lease_ms
                    )
                if mine:
                    await self.check(actor=actor, reason=reason)
            except DualwriteError as exc:
                logger.warning(
                    "guard pass failed (%s): %s",
                    type(exc).__name__,
                    exc,
                    extra={"event": "dualwrite.guard.failed"},
                )
            except Exception:  # a bug must not stop the guard for good: log it, try next time
                logger.exception("guard pass failed", extra={"event": "dualwrite.guard.failed"})
