"""A ledger update: counter increments for one row, and the one Lua fragment that applies them.

Every script that changes the ledger (the commit of a recorded event, a refusal, an outbox settle,
a late refusal, a dead letter's retry, a backfilled event) is composed by ``ledger_script`` from the
same fragment, and is called with the same leading keys and arguments, built by ``ledger_block``:

==========  =====================================================================================
``KEYS``    1 ledger row, 2 ledger index, 3 rollup, 4 rollup index, 5 divergence log
``ARGV``    1 index member, 2 index score, 3 divergence log maxlen, 4 ``n``, then ``n`` counter
            name/amount pairs, then ``d``, then ``d`` divergence entry field/value pairs
==========  =====================================================================================

The fragment defines ``ledger_update()``, which adds the increments to the row, lists the row in the
ledger index and refreshes its rollup copy (``dualwrite.ledger._rollups``) when there are any, and
appends the divergence entry when there is one. It also sets ``OWN_KEYS`` and ``OWN_ARGS``: the
positions of a script's own first key and argument, which follow the ledger's, so a script reads
them with ``unpack(KEYS, OWN_KEYS)`` and ``unpack(ARGV, OWN_ARGS)``. A script calls
``ledger_update()`` once, after its own guards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from dualwrite.keys import ShardKeys
from dualwrite.ledger._rollups import ROLLUP_LUA, rollup_key
from dualwrite.models import Leg, Stage, StripeFailure, UsageEvent
from dualwrite.periods import period_of

__all__ = [
    "COUNTER_FIELDS",
    "LEDGER_KEYS",
    "LedgerUpdate",
    "failure_code",
    "ledger_block",
    "ledger_script",
    "period_score",
    "safe_code",
]

COUNTER_FIELDS = (
    "events",
    "quantity",
    *(
        f"{leg}_{what}_{unit}"
        for leg in ("legacy", "meter")
        for what in ("expected", "accepted", "failed", "retired")
        for unit in ("events", "qty")
    ),
    "meter_late_refused_events",
    "meter_late_refused_qty",
    "meter_backfilled_events",
    "meter_backfilled_qty",
    "legacy_refused_events",
    "meter_refused_events",
    "translated_events",
    "delayed_events",
    "divergent_events",
    *(f"stage_{stage.value}_events" for stage in Stage),
)

#: How many keys the ledger block takes at the head of ``KEYS`` (a script's own keys follow).
LEDGER_KEYS = 5

_LEDGER_LUA = (
    """
-- dualwrite.ledger._update: one ledger update. KEYS[1..5]: ledger row, ledger index, rollup,
-- rollup index, divergence log. ARGV: index member, index score, divergence maxlen, n, n
-- name/amount pairs, d, d field/value pairs. The script's own keys and arguments follow.
local LEDGER_N = tonumber(ARGV[4])
local LEDGER_D_AT = 5 + 2 * LEDGER_N
local OWN_KEYS = """
    + str(LEDGER_KEYS + 1)
    + """
local LEDGER_D = tonumber(ARGV[LEDGER_D_AT])
local OWN_ARGS = LEDGER_D_AT + 1 + 2 * LEDGER_D
local function ledger_update()
  for i = 5, LEDGER_D_AT - 1, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
  if LEDGER_N > 0 then
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
    ledger_rollup(KEYS[1], ARGV[1], ARGV[2], KEYS[3], KEYS[4])
  end
  if LEDGER_D > 0 then
    local entry = {unpack(ARGV, LEDGER_D_AT + 1, OWN_ARGS - 1)}
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', unpack(entry))
  end
end
"""
)


def ledger_script(own: str) -> str:
    """A Lua script that writes the ledger: the rollup and ledger fragments, then ``own`` (which
    reads its keys from ``OWN_KEYS`` and its arguments from ``OWN_ARGS``, and calls
    ``ledger_update()``)."""
    return ROLLUP_LUA + _LEDGER_LUA + own


_QUEUED = ledger_script("ledger_update()\nreturn 1\n")


def ledger_block(
    shard: ShardKeys,
    *,
    row: str,
    member: str,
    score: int,
    increments: Mapping[str, int],
    divergence: Mapping[str, str] | None = None,
    divergence_maxlen: int = 0,
) -> tuple[list[str], list[str | int]]:
    """The leading keys and arguments of a script made by ``ledger_script``: the increments of
    ledger ``row`` (index ``member``, ``score``), and a ``divergence`` entry if any."""
    keys = [
        row,
        shard.ledger_index,
        # From the index member: commits spooled before rollups existed replay into them too.
        rollup_key(shard, member.split("|", 1)[0]),
        shard.rollup_index,
        shard.divergence,
    ]
    args: list[str | int] = [member, score, divergence_maxlen, len(increments)]
    for name, amount in increments.items():
        args += [name, amount]
    entry = divergence or {}
    args.append(len(entry))
    for name, value in entry.items():
        args += [name, value]
    return keys, args


def safe_code(code: str | None) -> str:
    """A Stripe error code fit for a counter name (``unknown`` when there is none)."""
    cleaned = "".join(ch for ch in (code or "") if ch.isalnum() or ch in "_-")[:64]
    return cleaned or "unknown"


def failure_code(failure: StripeFailure | None, *, expired: bool = False) -> str:
    """The code a failure is counted under: Stripe's code, else its type (``expired`` for age)."""
    if expired:
        return "expired"
    if failure is None:
        return "unknown"
    return safe_code(failure.code or failure.type)


def period_score(period: str) -> int:
    """The sort score of a period id (a UTC day or a billing period): its first day's number."""
    return period_of(period).start // 86_400


@dataclass(slots=True)
class LedgerUpdate:
    """Counter increments for one ledger hash, ready to be applied atomically with their cause."""

    keys: ShardKeys
    event: UsageEvent
    period: str | None = None
    """The ledger period id (default: the event's UTC day)."""
    increments: dict[str, int] = field(default_factory=dict)

    @property
    def period_id(self) -> str:
        """The period this update counts in."""
        return self.period or self.event.period

    @property
    def key(self) -> str:
        """The ledger hash this update applies to."""
        return self.keys.ledger(self.period_id, self.event.customer, self.event.event_name)

    @property
    def index_member(self) -> str:
        """The ledger index entry naming the hash."""
        return f"{self.period_id}|{self.event.customer}|{self.event.event_name}"

    @property
    def index_score(self) -> int:
        """The ledger index score (the period's first day's number)."""
        return period_score(self.period_id)

    def block(
        self, *, divergence: Mapping[str, str] | None = None, divergence_maxlen: int = 0
    ) -> tuple[list[str], list[str | int]]:
        """This update as the leading keys and arguments of a ``ledger_script`` (``ledger_block``),
        with a ``divergence`` entry if any."""
        return ledger_block(
            self.keys,
            row=self.key,
            member=self.index_member,
            score=self.index_score,
            increments=self.increments,
            divergence=divergence,
            divergence_maxlen=divergence_maxlen,
        )

    def queue(self, pipe: aioredis.client.Pipeline) -> None:
        """Queue this update on a pipeline, as one script (a refusal, counted on its own)."""
        keys, args = self.block()
        pipe.eval(_QUEUED, len(keys), *keys, *args)

    def add(self, name: str, amount: int = 1) -> LedgerUpdate:
        """Add ``amount`` to counter ``name``."""
        self.increments[name] = self.increments.get(name, 0) + amount
        return self

    def undone(self) -> LedgerUpdate:
        """The update that takes this one's counts back out (a dead letter sent again)."""
        return LedgerUpdate(
            self.keys,
            self.event,
            self.period,
            {name: -amount for name, amount in self.increments.items()},
        )

    def recorded(
        self,
        stage: Stage,
        authoritative: Leg,
        shadow: Leg | None,
        quantity: int,
        *,
        translated: bool,
    ) -> LedgerUpdate:
        """The authoritative write succeeded and the shadow (if any) is enqueued."""
        self.add("events").add("quantity", quantity).add(f"stage_{stage.value}_events")
        self._leg(authoritative, "expected", quantity)._leg(authoritative, "accepted", quantity)
        if shadow is not None:
            self._leg(shadow, "expected", quantity)
        if translated:
            self.add("translated_events")
        return self

    def refused(self, leg: Leg, code: str | None = None) -> LedgerUpdate:
        """The authoritative write was refused; the caller gets Stripe's error."""
        self.add(f"{leg.value}_refused_events")
        return self.add(f"{leg.value}_refused_code:{safe_code(code)}")

    def shadow_accepted(self, leg: Leg, quantity: int) -> LedgerUpdate:
        """A shadow write was accepted by Stripe."""
        return self._leg(leg, "accepted", quantity)

    def shadow_failed(
        self, leg: Leg, quantity: int, *, retired: bool, code: str | None = None
    ) -> LedgerUpdate:
        """A shadow write was refused for good or expired; ``retired`` ones are not divergence."""
        if retired:
            return self._leg(leg, "retired", quantity)
        self.add(f"{leg.value}_failed_code:{safe_code(code)}")
        return self._leg(leg, "failed", quantity).add("divergent_events")

    def late_refused(self, quantity: int) -> LedgerUpdate:
        """Stripe refused, in an error report, a meter event it had accepted: divergence."""
        self.add("meter_accepted_events", -1).add("meter_accepted_qty", -quantity)
        self.add("meter_late_refused_events").add("meter_late_refused_qty", quantity)
        return self.add("divergent_events")

    def _leg(self, leg: Leg, what: str, quantity: int) -> LedgerUpdate:
        self.add(f"{leg.value}_{what}_events")
        return self.add(f"{leg.value}_{what}_qty", quantity)
