"""The flag operations of the admin API: the same as ``dualwrite flags …``, as JSON.

======  ======================================  ===============================================
GET     ``/flags``                              default, kill switch, rollout, overrides, schedules
GET     ``/flags/default``                      the global default stage
PUT     ``/flags/default``                      set it
GET     ``/flags/kill``                         the kill switch
PUT     ``/flags/kill``                         turn it on (everyone legacy) or off
GET     ``/flags/rollout``                      each rollout stage's percentage
PUT     ``/flags/rollout``                      set one stage's percentage
GET     ``/customers/{customer}``               stage, the rule that decided it, override, schedule
PUT     ``/customers/{customer}/override``      pin the customer to a stage
DELETE  ``/customers/{customer}/override``      remove the override
POST    ``/customers/{customer}/schedule``      add a scheduled stage (stage X from time T)
DELETE  ``/customers/{customer}/schedule``      remove every scheduled stage
GET     ``/history``                            the audit log, newest first
======  ======================================  ===============================================

Changes name who made them (``actor``, default ``admin-api``) and why (``reason``): in the JSON
body, or in the query string for DELETE.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dualwrite.admin._api import AdminContext, ApiError, Call, Endpoint
from dualwrite.cutover import CutoverOps
from dualwrite.flags import AuditEntry, ResolutionReason, resolve_snapshot
from dualwrite.flags._codec import format_percent
from dualwrite.models import Stage

__all__ = ["FLAG_ENDPOINTS"]

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


class CustomerPath(_Input):
    """The customer in the path."""

    customer: str = Field(pattern=CUSTOMER_PATTERN, description="A Stripe customer id.")


class ChangeQuery(_Change):
    """Who removes something, and why (query string)."""


class StageChange(_Change):
    """A stage to set."""

    stage: Stage


class KillChange(_Change):
    """The kill switch's new state."""

    on: bool = Field(description="true: every customer resolves to legacy.")


class RolloutChange(_Change):
    """One rollout stage's new percentage."""

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


class ScheduleChange(_Change):
    """A scheduled stage: ``stage`` from Unix time ``at`` on."""

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


class ScheduledStage(_Output):
    """One scheduled entry."""

    at: int
    stage: Stage


class DefaultView(_Output):
    """The global default stage."""

    stage: Stage


class KillView(_Output):
    """The kill switch."""

    on: bool


class RolloutView(_Output):
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


class CustomerView(_Output):
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


# -- handlers ------------------------------------------------------------------------------------


async def _customer_view(ctx: AdminContext, customer: str) -> CustomerView:
    snapshot = await ctx.flags.snapshot(customer)
    resolution = resolve_snapshot(
        customer, snapshot, now=ctx.clock(), salt=ctx.settings.flags.rollout_salt
    )
    return CustomerView(
        customer=customer,
        stage=resolution.stage,
        reason=resolution.reason,
        detail=resolution.detail,
        valid_until=resolution.valid_until,
        override=snapshot.override,
        schedule=[ScheduledStage(at=at, stage=stage) for at, stage in snapshot.schedule],
    )


async def _rollout(ctx: AdminContext) -> RolloutView:
    rollout = await ctx.flags.get_rollout()
    return RolloutView(
        shadow=rollout.get(Stage.SHADOW, 0.0),
        primary=rollout.get(Stage.PRIMARY, 0.0),
        meter=rollout.get(Stage.METER, 0.0),
    )


async def list_flags(ctx: AdminContext, call: Call) -> FlagsView:
    """Every flag."""
    schedules = await ctx.flags.schedules()
    return FlagsView(
        default=await ctx.flags.get_default(),
        kill=await ctx.flags.get_kill(),
        rollout=await _rollout(ctx),
        overrides=await ctx.flags.overrides(),
        schedules={
            customer: [ScheduledStage(at=at, stage=stage) for at, stage in entries]
            for customer, entries in schedules.items()
        },
    )


async def get_default(ctx: AdminContext, call: Call) -> DefaultView:
    """The default stage."""
    return DefaultView(stage=await ctx.flags.get_default())


async def set_default(ctx: AdminContext, call: Call) -> DefaultView:
    """Set the default stage."""
    body = call.body_as(StageChange)
    await ctx.flags.set_default(body.stage, actor=body.actor, reason=body.reason)
    return DefaultView(stage=await ctx.flags.get_default())


async def get_kill(ctx: AdminContext, call: Call) -> KillView:
    """The kill switch."""
    return KillView(on=await ctx.flags.get_kill())


async def set_kill(ctx: AdminContext, call: Call) -> KillView:
    """Turn the kill switch on or off."""
    body = call.body_as(KillChange)
    if body.on:  # also cancels pending cutovers (their Stripe schedules released), audited
        ops = CutoverOps(ctx.redis, ctx.keys, ctx.settings, clock=ctx.clock)
        await ops.kill(actor=body.actor, reason=body.reason)
    else:
        await ctx.flags.set_kill(False, actor=body.actor, reason=body.reason)
    return KillView(on=await ctx.flags.get_kill())


async def get_rollout(ctx: AdminContext, call: Call) -> RolloutView:
    """The rollout percentages."""
    return await _rollout(ctx)


async def set_rollout(ctx: AdminContext, call: Call) -> RolloutView:
    """Set one rollout stage's percentage."""
    body = call.body_as(RolloutChange)
    try:
        await ctx.flags.set_rollout(
            Stage(body.stage), body.percent, actor=body.actor, reason=body.reason
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), param="percent") from None
    return await _rollout(ctx)


async def get_customer(ctx: AdminContext, call: Call) -> CustomerView:
    """A customer's stage and why."""
    return await _customer_view(ctx, call.path_as(CustomerPath).customer)


async def set_override(ctx: AdminContext, call: Call) -> CustomerView:
    """Pin a customer to a stage."""
    customer, body = call.path_as(CustomerPath).customer, call.body_as(StageChange)
    await ctx.flags.set_override(customer, body.stage, actor=body.actor, reason=body.reason)
    return await _customer_view(ctx, customer)


async def clear_override(ctx: AdminContext, call: Call) -> CustomerView:
    """Remove a customer's override."""
    customer, query = call.path_as(CustomerPath).customer, call.query_as(ChangeQuery)
    await ctx.flags.set_override(customer, None, actor=query.actor, reason=query.reason)
    return await _customer_view(ctx, customer)


async def add_schedule(ctx: AdminContext, call: Call) -> CustomerView:
    """Schedule a stage for a customer."""
    customer, body = call.path_as(CustomerPath).customer, call.body_as(ScheduleChange)
    await ctx.flags.schedule(customer, body.stage, body.at, actor=body.actor, reason=body.reason)
    return await _customer_view(ctx, customer)


async def clear_schedule(ctx: AdminContext, call: Call) -> CustomerView:
    """Remove a customer's schedule."""
    customer, query = call.path_as(CustomerPath).customer, call.query_as(ChangeQuery)
    await ctx.flags.clear_schedule(customer, actor=query.actor, reason=query.reason)
    return await _customer_view(ctx, customer)


async def history(ctx: AdminContext, call: Call) -> HistoryView:
    """The audit log."""
    query = call.query_as(HistoryQuery)
    entries = await ctx.flags.history(limit=query.limit, customer=query.customer)
    return HistoryView(entries=entries)


FLAG_ENDPOINTS = (
    Endpoint("GET", "/flags", list_flags, "Every flag", FlagsView),
    Endpoint("GET", "/flags/default", get_default, "The default stage", DefaultView),
    Endpoint(
        "PUT", "/flags/default", set_default, "Set the default stage", DefaultView, body=StageChange
    ),
    Endpoint("GET", "/flags/kill", get_kill, "The kill switch", KillView),
    Endpoint(
        "PUT", "/flags/kill", set_kill, "Turn the kill switch on or off", KillView, body=KillChange
    ),
    Endpoint("GET", "/flags/rollout", get_rollout, "The rollout percentages", RolloutView),
    Endpoint(
        "PUT",
        "/flags/rollout",
        set_rollout,
        "Set one stage's rollout percentage",
        RolloutView,
        body=RolloutChange,
    ),
    Endpoint(
        "GET",
        "/customers/{customer}",
        get_customer,
        "A customer's stage and the rule that decided it",
        CustomerView,
        path_params=CustomerPath,
    ),
    Endpoint(
        "PUT",
        "/customers/{customer}/override",
        set_override,
        "Pin a customer to a stage",
        CustomerView,
        path_params=CustomerPath,
        body=StageChange,
    ),
    Endpoint(
        "DELETE",
        "/customers/{customer}/override",
        clear_override,
        "Remove a customer's override",
        CustomerView,
        path_params=CustomerPath,
        query=ChangeQuery,
    ),
    Endpoint(
        "POST",
        "/customers/{customer}/schedule",
        add_schedule,
        "Move a customer to a stage at a given time",
        CustomerView,
        path_params=CustomerPath,
        body=ScheduleChange,
        errors=(409,),
    ),
    Endpoint(
        "DELETE",
        "/customers/{customer}/schedule",
        clear_schedule,
        "Remove a customer's scheduled stages",
        CustomerView,
        path_params=CustomerPath,
        query=ChangeQuery,
    ),
    Endpoint(
        "GET",
        "/history",
        history,
        "The flag audit log, newest first",
        HistoryView,
        query=HistoryQuery,
    ),
)
