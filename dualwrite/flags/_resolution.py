"""Pure stage resolution: from a ``FlagSnapshot`` and the time to a ``Resolution``. No I/O here."""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import cast

from dualwrite.flags._models import ROLLOUT_STAGES, FlagSnapshot, Resolution
from dualwrite.models import Stage

__all__ = [
    "BUCKETS",
    "KILL_HOLD_STAGE",
    "basis_points",
    "resolve_snapshot",
    "rollout_bucket",
    "rollout_stage",
    "rollout_stages",
    "stage_only",
]

#: Rollout buckets: one per basis point (0.01 %) of customers.
BUCKETS = 10_000

_MOST_ADVANCED_FIRST = tuple(reversed(ROLLOUT_STAGES))

#: Where the kill switch holds a customer whose item is on its meter-backed price.
KILL_HOLD_STAGE = Stage.PRIMARY


def rollout_bucket(customer: str, salt: str) -> int:
    """The customer's rollout bucket, 0 … 9,999 (one per basis point).

    The formula is ``int.from_bytes(sha256(f"{salt}:{customer}").digest()[:8], "big") % 10_000``.

    It must never change: every customer's stage under a percentage rollout depends on it, so a new
    formula (like a new salt) would move customers between stages in the middle of a migration, and
    could split one billing period across the legacy and meter systems.
    """
    digest = hashlib.sha256(f"{salt}:{customer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def basis_points(percent: float) -> int:
    """A rollout percentage as a bucket threshold: a customer is in when ``bucket < threshold``."""
    return round(percent * 100)


def rollout_stage(bucket: int, rollout: Mapping[Stage, float]) -> Stage | None:
    """The most advanced stage whose rollout includes ``bucket`` (meter > primary > shadow), if any.

    Raising one stage's percentage therefore only adds buckets to that stage: a customer already in
    a more advanced stage's rollout stays there.
    """
    for stage in _MOST_ADVANCED_FIRST:
        if bucket < basis_points(rollout.get(stage, 0.0)):
            return stage
    return None


_DIGEST = operator.methodcaller("digest")
_FROM_BYTES = cast("Callable[[bytes, str], int]", int.from_bytes)


def rollout_stages(
    customers: Sequence[str], rollout: Mapping[Stage, float], default: Stage, salt: str
) -> list[Stage]:
    """``rollout_stage(rollout_bucket(customer, salt), rollout) or default`` for each customer, in
    order: the stage of customers that no kill switch, override or schedule decides.

    The report resolves a million customers: each stage is read from a table of the 10,000
    buckets, and the buckets are computed by the same formula as ``rollout_bucket``, chained in C
    (no Python step per customer). No rollout at all: no hashing.
    """
    table = [rollout_stage(bucket, rollout) or default for bucket in range(BUCKETS)]
    if all(stage is default for stage in table):
        return [default] * len(customers)
    texts = map(f"{salt}:".__add__, customers)
    digests = map(_DIGEST, map(hashlib.sha256, map(str.encode, texts)))
    # The digest's first 8 bytes as a big-endian number: the whole digest's, shifted.
    words = map(operator.rshift, map(_FROM_BYTES, digests, repeat("big")), repeat(192))
    return list(map(table.__getitem__, map(operator.mod, words, repeat(BUCKETS))))


def resolve_snapshot(customer: str, snapshot: FlagSnapshot, *, now: float, salt: str) -> Resolution:
    """Resolve one customer's stage; the first matching rule wins.

    1. kill switch on: everyone is ``legacy``, except a customer whose item moved to its
       meter-backed price (``billing.price_move_at <= now``): Stripe refuses its usage records, so
       it is held at ``primary``, the last stage whose authoritative leg Stripe accepts;
    2. the customer's override;
    3. the customer's latest scheduled entry with ``at <= now``;
    4. the most advanced percentage rollout that includes the customer's bucket;
    5. the global default.

    ``valid_until`` is the time of the customer's next scheduled entry (``at > now``), if any.
    ``now`` is the customer's own: its Stripe test clock's frozen time when it lives on one
    (``StageResolver`` and ``CutoverOps`` read it), else the process clock.
    """
    current: tuple[int, Stage] | None = None
    valid_until: float | None = None
    for at, stage in snapshot.schedule:
        if at <= now:
            if current is None or at >= current[0]:
                current = (at, stage)
        elif valid_until is None or at < valid_until:
            valid_until = float(at)

    if snapshot.kill:
        moved = snapshot.billing.price_move_at
        if moved is not None and moved <= now:
            return Resolution(
                stage=KILL_HOLD_STAGE,
                reason="kill",
                detail=(
                    f"kill switch is on, but the item of {customer} moved to its meter-backed "
                    f"price at {moved} (Stripe refuses its usage records): held at "
                    f"{KILL_HOLD_STAGE.value}"
                ),
                valid_until=valid_until,
            )
        if moved is not None and moved > now and (valid_until is None or moved < valid_until):
            valid_until = float(moved)
        return Resolution(
            stage=Stage.LEGACY,
            reason="kill",
            detail="kill switch is on: every customer is legacy",
            valid_until=valid_until,
        )
    if snapshot.override is not None:
        return Resolution(
            stage=snapshot.override,
            reason="override",
            detail=f"override for {customer}: {snapshot.override.value}",
            valid_until=valid_until,
        )
    if current is not None:
        return Resolution(
            stage=current[1],
            reason="schedule",
            detail=f"scheduled {current[1].value} from {current[0]}",
            valid_until=valid_until,
        )
    bucket = rollout_bucket(customer, salt)
    rolled = rollout_stage(bucket, snapshot.rollout)
    if rolled is not None:
        percent = snapshot.rollout[rolled]
        return Resolution(
            stage=rolled,
            reason="rollout",
            detail=(
                f"bucket {bucket} < {basis_points(percent)}: in the {percent:g}% "
                f"{rolled.value} rollout"
            ),
            valid_until=valid_until,
        )
    return Resolution(
        stage=snapshot.default,
        reason="default",
        detail=f"global default: {snapshot.default.value}",
        valid_until=valid_until,
    )


def stage_only(
    customer: str,
    *,
    kill: bool,
    override: Stage | None,
    schedule: Sequence[tuple[int, Stage]],
    rollout: Mapping[Stage, float],
    default: Stage,
    now: float,
    salt: str,
    price_move_at: int | None = None,
) -> Stage:
    """The stage ``resolve_snapshot`` gives, without building a ``Resolution``: the same rules in
    the same order, for resolving many customers at once (the report)."""
    if kill:
        moved = price_move_at is not None and price_move_at <= now
        return KILL_HOLD_STAGE if moved else Stage.LEGACY
    if override is not None:
        return override
    current: tuple[int, Stage] | None = None
    for at, stage in schedule:
        if at <= now and (current is None or at >= current[0]):
            current = (at, stage)
    if current is not None:
        return current[1]
    return rollout_stage(rollout_bucket(customer, salt), rollout) or default
