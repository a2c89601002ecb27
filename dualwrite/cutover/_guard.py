"""``Guard``: sends diverging customers (or the whole rollout) back to the previous safe stage.

A pass judges the report's lines (per-customer totals, status and difference, from the ledger and
the divergence log) over the last ``lookback_days``, of every customer past ``legacy``. A full pass
(``dualwrite.report.build_report``) reads every customer; it runs first, then once an hour
(``full_every``), and whenever the flags' configuration (rollouts, default stage, kill switch) or
the guardrails changed since the last one. Every other pass reads only the customers whose ledger
rows changed since the pass before (``dualwrite.report.build_lines``): every script writing a
ledger row lists its customer in the shard's ``guard-changed`` set in the same atomic step, and a
pass takes that set (into ``guard-taking``, cleared once the pass is done: a failed pass leaves it
to the next). So a pass costs in proportion to the customers that changed, not to all of them.
Each customer is judged:

* more than ``max_divergent_events`` divergent events (dead-lettered shadow writes, late refusals),
  or a difference between the legs above ``max_difference_pct`` once nothing is pending: the
  customer is rolled back one stage (``CutoverOps.rollback``: an override, its schedule cleared);
* more than ``max_divergent_share_pct`` of at least ``min_customers`` checked customers tripped
  (between full passes: of the larger of the last full pass's count and this pass's): the whole
  rollout goes back (``global_action``: ``rollback`` moves every percentage rollout and
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
from dualwrite.ledger import Ledger, backfill, list_customer_rows
from dualwrite.models import Stage, utc_day
from dualwrite.redis_client import as_str, as_str_list, store_errors
from dualwrite.report import CustomerReport, build_lines, build_report


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

#: How often (seconds) a pass judges every customer, not only those that changed.
FULL_PASS_SECONDS = 3_600.0

# KEYS: guard-changed, guard-taking. Moves the changed customers into the set the pass judges
# (which still holds a failed or dry pass's customers) and returns them.
_TAKE_CHANGED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
  redis.call('DEL', KEYS[1])
end
return redis.call('SMEMBERS', KEYS[2])
"""


class Guard:
    """Checks divergence against the guardrails and rolls back what crossed them.

    Args:
        ops: makes the rollbacks (and holds the flag store).
        ledger: the ledger and divergence log the report reads.
        resolver: resolves many customers' stages at once (``StageResolver``).
        settings: the thresholds.
        report: the report's readiness settings (passed through to ``build_report``).
        clock: Unix time.
        full_every: seconds between full passes (the passes between read changed customers only).
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
        full_every: float = FULL_PASS_SECONDS,
    ) -> None:
        self._ops = ops
        self._ledger = ledger
        self._resolver = resolver
        self._settings = settings
        self._report = report or ReportSettings()
        self._clock = clock
        self._full_every = full_every
        self._take = ops.redis.register_script(_TAKE_CHANGED)

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

    async def _baselines(self, customers: list[str] | None) -> dict[str, _Baseline]:
        """The guard's state of ``customers`` (None: of every customer it ever rolled back)."""
        redis, key = self._ops.redis, self._ops.keys.guard_state
        async with store_errors("reading the guard's state"):
            if customers is None:
                raw = dict(await redis.hgetall(key) or {})
            elif customers:
                values = await redis.hmget(key, customers)
                raw = {name: text for name, text in zip(customers, values, strict=True) if text}
            else:
                raw = {}
        found: dict[str, _Baseline] = {}
        for customer, text in raw.items():
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
        inputs = await self._inputs()
        async with store_errors("reading the guard's last full pass"):
            last = {
                str(as_str(name)): str(as_str(value))
                for name, value in dict(
                    await self._ops.redis.hgetall(self._ops.keys.guard_sweep) or {}
                ).items()
            }
        full = (
            last.get("inputs") != inputs
            or not 0 <= now - float(last.get("at") or "-inf") < self._full_every
        )
        if full:
            await self._prepare()
        changed = await self._take_changed()
        if full:
            report = await build_report(
                self._ledger, self._resolver, since=since, settings=self._report, now=now
            )
            lines = report.customers
        else:
            lines = await build_lines(
                self._ledger,
                self._resolver,
                [customer for names in changed.values() for customer in names],
                since=since,
                settings=self._report,
                now=now,
            )
        checked = [line for line in lines if line.stage is not Stage.LEGACY]
        baselines = await self._baselines(None if full else [line.customer for line in checked])
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
        # Between full passes the share is of the customers the last full pass checked (kept as a
        # count), or of this pass's if more: a few changed customers are not the whole rollout.
        population = len(checked) if full else max(int(last.get("checked") or 0), len(checked))
        share = round(len(trips) * 100 / population, 2) if population else 0.0
        global_trip = (
            population >= self._settings.min_customers
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
        if not dry_run:
            await self._done(changed, full=full, at=now, checked=len(checked), inputs=inputs)
        return GuardResult(
            checked=len(checked),
            full=full,
            tripped=done,
            global_tripped=global_trip,
            divergent_share_pct=share,
            dry_run=dry_run,
            actions=actions,
        )

    async def _inputs(self) -> str:
        """What a full pass depends on besides the ledger: the flags' configuration (rollouts,
        default stage, kill switch) and the guardrails. A change means a full pass."""
        async with store_errors("reading the flags' configuration"):
            config = dict(await self._ops.redis.hgetall(self._ops.keys.flags_config) or {})
        flags = sorted((str(as_str(name)), str(as_str(value))) for name, value in config.items())
        return json.dumps([flags, self._settings.model_dump(mode="json")], sort_keys=True)

    async def _prepare(self) -> None:
        """Once per shard, before a full pass takes the changed customers: copy the rows older
        than the rollups (which marks their customers changed: this pass takes them) and list
        every row under its customer, so the passes after it never pay for either."""
        redis = self._ops.redis
        for shard in self._ops.keys.all_shards():
            async with store_errors("reading the rollups' state"):
                ready, listed = (
                    await redis.exists(shard.rollup_ready),
                    await redis.exists(shard.customer_rows_ready),
                )
            if not ready:
                await backfill(redis, shard)
            if not listed:
                await list_customer_rows(redis, shard)

    async def _take_changed(self) -> dict[int, list[str]]:
        """Per shard, the customers whose ledger rows changed since the last pass that finished."""
        taken: dict[int, list[str]] = {}
        async with store_errors("taking the customers that changed"):
            for shard in self._ops.keys.all_shards():
                names = as_str_list(
                    await self._take(keys=[shard.guard_changed, shard.guard_taking])
                )
                if names:
                    taken[shard.shard] = names
        return taken

    async def _done(
        self, changed: dict[int, list[str]], *, full: bool, at: float, checked: int, inputs: str
    ) -> None:
        """The pass is over: forget the customers it judged, and remember a full pass."""
        keys = self._ops.keys
        async with store_errors("writing the guard's pass"):
            for index in changed:
                await self._ops.redis.delete(keys.shard(index).guard_taking)
            if full:
                await self._ops.redis.hset(
                    keys.guard_sweep, mapping={"at": at, "checked": checked, "inputs": inputs}
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
