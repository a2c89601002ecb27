"""The inputs and outputs of the admin API's flag operations (``_flags``), as pydantic models:
validated before a handler runs, and described in the OpenAPI document from the same classes."""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dualwrite.cutover import FlagChange
from dualwrite.flags import AuditEntry, ResolutionReason
from dualwrite.flags._codec import format_percent
from dualwrite.models import Stage

__all__ = [
    "CUSTOMER_PATTERN",
    "DEFAULT_ACTOR",
    "ChangeQuery",
    "CustomerPath",
    "CustomerView",
    "DefaultView",
    "DryRunQuery",
    "FlagsView",
    "HistoryQuery",
    "HistoryView",
    "KillChange",
    "KillView",
    "RolloutChange",
    "RolloutView",
    "ScheduleChange",
    "ScheduledStage",
    "StageChange",
]

CUSTOMER_PATTERN = r"^[A-Za-z0-9_\-]{1,255}$"
DEFAULT_ACTOR = "admin-api"
RolloutStage = Literal["shadow", "primary", "meter"]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Change(_Input):
    actor: str = Field(
        default=DEFAULT_ACTOR,
        min_length=1,
        max_length=200,
        pattern=r"\S",
        description="Who makes the change (kept in the audit log).",
    )
    reason: str = Field(default="", max_length=1000, description="Why (kept in the audit log).")

    @field_validator("actor")
    @classmethod
    def _printable_actor(cls, value: str) -> str:
        # The schema's pattern is ECMA's \S, for which separators such as U+001C are not space;
        # the flag store strips them and refuses what is left empty. Control characters have no
        # business in an audit log's "who" either.
        if not value.strip() or any(unicodedata.category(char)[0] == "C" for char in value):
            raise ValueError("actor must be printable text naming who makes the change")
        return value


class _Forced(_Change):
    force: bool = Field(
        default=False, description="Allow a move of more than one stage forward, or back."
    )


class DryRunQuery(_Input):
    """``?dry_run=true``: change nothing, answer with the changes it would make."""

    dry_run: bool = Field(default=False, description="Change nothing; list what would change.")


class CustomerPath(_Input):
    """The customer in the path."""

    customer: str = Field(pattern=CUSTOMER_PATTERN, description="A Stripe customer id.")


class ChangeQuery(_Change):
    """Who removes something, and why (query string)."""

    force: bool = Field(
        default=False, description="Allow a removal that moves the customer back, or on by more."
    )
    dry_run: bool = Field(default=False, description="Change nothing; list what would change.")


class StageChange(_Forced):
    """A stage to set (one forward unless ``force``)."""

    stage: Stage


class KillChange(_Change):
    """The kill switch's new state."""

    on: bool = Field(description="true: every customer resolves to legacy.")


class RolloutChange(_Forced):
    """One rollout stage's new percentage (lowering it needs ``force``)."""

    stage: RolloutStage
    percent: float = Field(
        ge=0, le=100, multiple_of=0.01, description="Share of customers, 0 to 100, two decimals."
    )

    @field_validator("percent", mode="before")
    @classmethod
    def _two_decimals(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                format_percent(Stage.SHADOW, value)
            except ValueError as exc:
                raise ValueError(str(exc).replace("rollout percent ", "")) from None
        return value


class ScheduleChange(_Forced):
    """A scheduled stage: ``stage`` from Unix time ``at`` on (in the past only with ``force``)."""

    stage: Stage
    at: int = Field(gt=0, lt=2**40, description="Unix time in whole seconds.")


class HistoryQuery(_Input):
    """Which audit entries to list."""

    customer: str | None = Field(
        default=None,
        pattern=r"^(\*|[A-Za-z0-9_\-]{1,255})$",
        description="Only changes about this customer (``*``: global changes).",
    )
    limit: int = Field(default=50, ge=1, le=10_000)


class _Output(BaseModel):
    model_config = ConfigDict(frozen=True)


class _Changed(_Output):
    dry_run: bool = Field(default=False, description="true: nothing was changed.")
    changes: list[FlagChange] = Field(
        default_factory=list, description="The changes made (or, on a dry run, that would be)."
    )


class ScheduledStage(_Output):
    """One scheduled entry."""

    at: int
    stage: Stage


class DefaultView(_Changed):
    """The global default stage."""

    stage: Stage


class KillView(_Changed):
    """The kill switch."""

    on: bool


class RolloutView(_Changed):
    """Each rollout stage's percentage of customers."""

    shadow: float
    primary: float
    meter: float


class FlagsView(_Output):
    """Every flag: what ``dualwrite flags list`` shows."""

    default: Stage
    kill: bool
    rollout: RolloutView
    overrides: dict[str, Stage]
    schedules: dict[str, list[ScheduledStage]]


class CustomerView(_Changed):
    """A customer's stage now, the rule that decided it, and its own flags."""

    customer: str
    stage: Stage
    reason: ResolutionReason
    detail: str
    valid_until: float | None = Field(description="When a scheduled change may alter the stage.")
    override: Stage | None
    schedule: list[ScheduledStage]


class HistoryView(_Output):
    """Flag changes, newest first."""

    entries: list[AuditEntry]
