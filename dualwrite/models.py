"""The values that cross dualwrite's boundaries: stages, usage events and write outcomes.

A ``UsageEvent`` is fixed once, at intercept time (identifier minted, ``now`` resolved), and every later
write of either leg reuses it, so retries and the outbox always carry the same instant and the same keys.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_METER_VALUE",
    "Action",
    "EventPlan",
    "IdentifierSource",
    "Leg",
    "RecordOutcome",
    "ShadowStatus",
    "Stage",
    "StagePlan",
    "StripeFailure",
    "TimestampSource",
    "UsageEvent",
    "WriteResult",
    "mint_identifier",
    "plan_for",
    "stripe_error_body",
    "utc_day",
    "utc_time",
]

#: Stripe refuses meter values with more than 15 significant digits (API 2026-04-22.dahlia).
MAX_METER_VALUE = 10**15 - 1

Action = Literal["increment", "set"]
"""Legacy usage-record action: ``increment`` adds to the usage at a timestamp, ``set`` overwrites it."""

TimestampSource = Literal["request", "intercept"]
"""Whether the caller gave the timestamp, or it is the instant of the first intercept ("now")."""

IdentifierSource = Literal["idempotency_key", "field", "minted"]
"""Where an event's identifier came from: the caller's Idempotency-Key, a configured field, or minted."""

ShadowStatus = Literal["enqueued", "spooled", "not_applicable", "skipped", "enqueue_failed"]
"""What happened to the shadow leg: queued in the outbox; kept in the local spool until Redis returns;
no shadow at this stage; skipped because the authoritative write failed; or lost because neither
Redis nor the spool could take it (logged)."""


class Stage(StrEnum):
    """A customer's migration stage; it decides which leg is authoritative and which is a shadow."""

    LEGACY = "legacy"
    SHADOW = "shadow"
    PRIMARY = "primary"
    METER = "meter"

    @classmethod
    def _missing_(cls, value: object) -> Stage | None:
        # Stage names are case-insensitive everywhere (config, CLI, admin API): "Shadow" is shadow.
        if isinstance(value, str):
            return cls.__members__.get(value.strip().upper())
        return None

    @property
    def rank(self) -> int:
        """Position in the migration order (legacy=0 … meter=3)."""
        return _STAGE_ORDER.index(self)


_STAGE_ORDER = (Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY, Stage.METER)


class Leg(StrEnum):
    """One of the two write paths to Stripe."""

    LEGACY = "legacy"
    METER = "meter"


class StagePlan(BaseModel):
    """The legs a stage writes: the authoritative one synchronously, the shadow through the outbox."""

    model_config = ConfigDict(frozen=True)

    authoritative: Leg
    shadow: Leg | None


_PLANS = {
    Stage.LEGACY: StagePlan(authoritative=Leg.LEGACY, shadow=None),
    Stage.SHADOW: StagePlan(authoritative=Leg.LEGACY, shadow=Leg.METER),
    Stage.PRIMARY: StagePlan(authoritative=Leg.METER, shadow=Leg.LEGACY),
    Stage.METER: StagePlan(authoritative=Leg.METER, shadow=None),
}


def plan_for(stage: Stage) -> StagePlan:
    """Return which leg is authoritative and which (if any) is the shadow at ``stage``."""
    return _PLANS[stage]


class EventPlan(BaseModel):
    """What one event writes, fixed when it is first intercepted and kept with its claim.

    Every later attempt of the event (a caller's retry, a recovery after a crash) writes these
    legs under these Stripe idempotency keys, whatever the customer's stage has become: a retry
    that crossed a stage change must never write the legacy leg a second time under another key.
    """

    model_config = ConfigDict(frozen=True)

    stage: Stage
    authoritative: Leg
    shadow: Leg | None
    legacy_key: str | None = None
    """The ``Idempotency-Key`` of the authoritative legacy write when it is not the derived one
    (the proxy forwards its caller's request under the caller's own key)."""
    legacy_expand: tuple[str, ...] = ()
    """The ``expand[]`` that request carried: a replay must send the same parameters."""

    @classmethod
    def at(cls, stage: Stage, **fields: Any) -> EventPlan:
        """The plan of an event first intercepted at ``stage``."""
        if not fields and cls is EventPlan:
            # Frozen: every event first intercepted at a stage shares its plan (not rebuilt, nor
            # validated again, per request).
            return _STAGE_EVENT_PLANS[stage]
        legs = plan_for(stage)
        return cls(stage=stage, authoritative=legs.authoritative, shadow=legs.shadow, **fields)

    @property
    def legs(self) -> StagePlan:
        """The authoritative and shadow legs."""
        known = _PLANS_BY_LEGS.get((self.authoritative, self.shadow))
        return known or StagePlan(authoritative=self.authoritative, shadow=self.shadow)

    def legacy_idempotency_key(self, event: UsageEvent) -> str:
        """The key the event's legacy write goes under (the caller's, or the derived one)."""
        return self.legacy_key or event.idempotency_key(Leg.LEGACY)


_PLANS_BY_LEGS = {(plan.authoritative, plan.shadow): plan for plan in _PLANS.values()}
_STAGE_EVENT_PLANS = {
    stage: EventPlan(stage=stage, authoritative=legs.authoritative, shadow=legs.shadow)
    for stage, legs in _PLANS.items()
}


def mint_identifier() -> str:
    """A fresh identifier for an event whose caller sent no Idempotency-Key."""
    return f"dwev_{uuid.uuid4().hex}"


def utc_day(timestamp: int) -> str:
    """The UTC calendar day (``YYYY-MM-DD``) a Unix timestamp falls in: the ledger's default period."""
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d")


def utc_time(timestamp: float) -> str:
    """A Unix time as ISO 8601 UTC to the second (``2026-12-01T00:00:00Z``): how every message,
    table and audit text shows an instant (past the year 9999, which ISO 8601 cannot write without
    an agreement, as Unix seconds)."""
    try:
        return datetime.fromtimestamp(int(timestamp), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return f"{int(timestamp)} (Unix seconds)"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


_FINGERPRINT_EXCLUDED = frozenset({"identifier", "identifier_source", "timestamp_source"})
_FINGERPRINT_EXCLUDED_INTERCEPT = _FINGERPRINT_EXCLUDED | {"timestamp"}


class UsageEvent(BaseModel):
    """One unit of reported usage, fixed at intercept and shared by both legs and every retry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identifier: str = Field(min_length=1, max_length=255)
    customer: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-]+$")
    event_name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_\-.:]+$")
    subscription_item: str | None = Field(
        default=None, min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-]+$"
    )
    quantity: int = Field(ge=0, le=MAX_METER_VALUE)
    timestamp: int = Field(gt=0, lt=2**40)
    action: Action = "increment"
    identifier_source: IdentifierSource = "minted"
    timestamp_source: TimestampSource = "request"

    @field_validator("identifier")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            msg = "identifier must contain printable characters only"
            raise ValueError(msg)
        return value

    def idempotency_key(self, leg: Leg) -> str:
        """The Stripe ``Idempotency-Key`` for one leg: deterministic, and never shared between legs,
        because Stripe refuses a key reused on a different endpoint."""
        return f"dw-{leg.value}-{_digest(leg.value, self.identifier)}"

    @property
    def meter_identifier(self) -> str:
        """The meter event's ``identifier`` (Stripe dedupes on it for at least 24 hours)."""
        return f"dw-{_digest('meter-identifier', self.identifier)}"

    @property
    def period(self) -> str:
        """The ledger period the event belongs to (its UTC day)."""
        return utc_day(self.timestamp)

    def fingerprint(self) -> str:
        """A digest of the usage itself: a reused identifier must carry the same usage.

        A timestamp fixed at intercept ("now") is left out: a caller's retry arrives later, and must
        be recognised as the same usage (it is then written with the first attempt's instant).
        """
        exclude = (
            _FINGERPRINT_EXCLUDED_INTERCEPT
            if self.timestamp_source == "intercept"
            else (_FINGERPRINT_EXCLUDED)
        )
        # The fields' plain values, as model_dump gives them (str, int, None), without its cost on
        # the request path.
        usage = {
            name: getattr(self, name) for name in type(self).model_fields if name not in exclude
        }
        return _digest(json.dumps(usage, sort_keys=True))


def stripe_error_body(
    error_type: str, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """Stripe's error shape, ``{"error": {"type", "message", "code"?, "param"?}}``: the one place
    it is built (every error reply of dualwrite's own, and Stripe's refusals handed back)."""
    error: dict[str, Any] = {"type": error_type, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return {"error": error}


class StripeFailure(BaseModel):
    """Why Stripe (or the network on the way) refused a write, kept with Stripe's own code."""

    model_config = ConfigDict(frozen=True)

    http_status: int | None = None
    type: str = "api_error"
    code: str | None = None
    message: str = ""
    param: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    request_id: str | None = None

    @property
    def refused_key(self) -> bool:
        """Whether Stripe refused the API key itself (not the request made with it)."""
        return self.http_status in (401, 403) or self.type == "authentication_error"

    def error_body(self) -> dict[str, Any]:
        """Stripe's error shape (``{"error": {...}}``), for handing the refusal back to a caller."""
        return stripe_error_body(self.type, self.message, code=self.code, param=self.param)


class WriteResult(BaseModel):
    """The result of one leg's write to Stripe."""

    model_config = ConfigDict(frozen=True)

    leg: Leg
    accepted: bool
    stripe_id: str | None = None
    http_status: int | None = None
    response: dict[str, Any] | None = None
    failure: StripeFailure | None = None
    value: int | None = None
    """The quantity this leg carried (a translated ``set`` may differ from the event's quantity)."""


class RecordOutcome(BaseModel):
    """What ``engine.record()`` did with one event; the middleware puts it on ``request.state``."""

    model_config = ConfigDict(frozen=True)

    event: UsageEvent
    stage: Stage
    authoritative: WriteResult
    shadow_leg: Leg | None
    shadow_status: ShadowStatus
    replayed: bool = False
    translated: bool = False
    """True when a legacy ``set`` was turned into a different meter value."""

    @property
    def accepted(self) -> bool:
        """Whether the authoritative write succeeded (what the caller should be told)."""
        return self.authoritative.accepted
