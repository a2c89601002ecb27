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
body, or in the query string for DELETE. They follow the cutover rules: one stage forward at a
time unless ``force`` (a move back is a rollback), no schedule in the past; ``?dry_run=true``
changes nothing and answers with the changes it would make (``changes``, ``dry_run: true``).
"""

from __future__ import annotations

from dualwrite.admin._api import AdminContext, ApiError, Call, Endpoint
from dualwrite.admin._flag_models import (
    ChangeQuery,
    CustomerPath,
    CustomerView,
    DefaultView,
    DryRunQuery,
    FlagsView,
    HistoryQuery,
    HistoryView,
    KillChange,
    KillView,
    RolloutChange,
    RolloutView,
    ScheduleChange,
    ScheduledStage,
    StageChange,
)
from dualwrite.cutover import (
    CutoverInputError,
    CutoverOps,
    FlagChange,
    OperationResult,
    clear_override as clear_override_op,
    schedule_stage,
    set_default as set_default_op,
)
from dualwrite.cutover._plans import clear_schedule_change
from dualwrite.flags import resolve_snapshot
from dualwrite.models import Stage

__all__ = ["FLAG_ENDPOINTS"]

# -- handlers ------------------------------------------------------------------------------------


def _ops(ctx: AdminContext) -> CutoverOps:
    return CutoverOps(ctx.redis, ctx.keys, ctx.settings, clock=ctx.clock)


def _changed(result: OperationResult) -> dict[str, object]:
    return {"dry_run": result.dry_run, "changes": result.changes}


def _refused(exc: CutoverInputError, param: str) -> ApiError:
    return ApiError(400, str(exc), param=param)


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
    body, query = call.body_as(StageChange), call.query_as(DryRunQuery)
    try:
        result = await set_default_op(
            _ops(ctx),
            body.stage,
            actor=body.actor,
            reason=body.reason,
            force=body.force,
            dry_run=query.dry_run,
        )
    except CutoverInputError as exc:
        raise _refused(exc, "stage") from None
    return DefaultView(stage=await ctx.flags.get_default(), **_changed(result))


async def get_kill(ctx: AdminContext, call: Call) -> KillView:
    """The kill switch."""
    return KillView(on=await ctx.flags.get_kill())


async def set_kill(ctx: AdminContext, call: Call) -> KillView:
    """Turn the kill switch on or off."""
    body, query = call.body_as(KillChange), call.query_as(DryRunQuery)
    changes: list[FlagChange] = []
    if body.on:  # also cancels pending cutovers (their Stripe schedules released), audited
        result = await _ops(ctx).kill(actor=body.actor, reason=body.reason, dry_run=query.dry_run)
        changes = result.changes
    elif await ctx.flags.get_kill():
        changes = [FlagChange(kind="kill", customer="*", old="on", new="off")]
        if not query.dry_run:
            await ctx.flags.set_kill(False, actor=body.actor, reason=body.reason)
    return KillView(on=await ctx.flags.get_kill(), dry_run=query.dry_run, changes=changes)


async def get_rollout(ctx: AdminContext, call: Call) -> RolloutView:
    """The rollout percentages."""
    return await _rollout(ctx)


async def set_rollout(ctx: AdminContext, call: Call) -> RolloutView:
    """Set one rollout stage's percentage."""
    body, query = call.body_as(RolloutChange), call.query_as(DryRunQuery)
    try:
        result = await _ops(ctx).rollout_percent(
            Stage(body.stage),
            body.percent,
            actor=body.actor,
            reason=body.reason,
            force=body.force,
            dry_run=query.dry_run,
        )
    except ValueError as exc:  # CutoverInputError included
        raise ApiError(400, str(exc), param="percent") from None
    return (await _rollout(ctx)).model_copy(update=_changed(result))


async def get_customer(ctx: AdminContext, call: Call) -> CustomerView:
    """A customer's stage and why."""
    return await _customer_view(ctx, call.path_as(CustomerPath).customer)


async def set_override(ctx: AdminContext, call: Call) -> CustomerView:
    """Pin a customer to a stage."""
    customer, body = call.path_as(CustomerPath).customer, call.body_as(StageChange)
    dry_run = call.query_as(DryRunQuery).dry_run
    try:
        result = await _ops(ctx).move_customers(
            [customer],
            body.stage,
            actor=body.actor,
            reason=body.reason,
            force=body.force,
            dry_run=dry_run,
        )
    except CutoverInputError as exc:
        raise _refused(exc, "stage") from None
    return (await _customer_view(ctx, customer)).model_copy(update=_changed(result))


async def clear_override(ctx: AdminContext, call: Call) -> CustomerView:
    """Remove a customer's override."""
    customer, query = call.path_as(CustomerPath).customer, call.query_as(ChangeQuery)
    try:
        result = await clear_override_op(
            _ops(ctx),
            customer,
            actor=query.actor,
            reason=query.reason,
            force=query.force,
            dry_run=query.dry_run,
        )
    except CutoverInputError as exc:
        raise _refused(exc, "force") from None
    return (await _customer_view(ctx, customer)).model_copy(update=_changed(result))


async def add_schedule(ctx: AdminContext, call: Call) -> CustomerView:
    """Schedule a stage for a customer."""
    customer, body = call.path_as(CustomerPath).customer, call.body_as(ScheduleChange)
    dry_run = call.query_as(DryRunQuery).dry_run
    try:
        result = await schedule_stage(
            _ops(ctx),
            customer,
            body.stage,
            body.at,
            actor=body.actor,
            reason=body.reason,
            force=body.force,
            dry_run=dry_run,
        )
    except CutoverInputError as exc:
        raise _refused(exc, "at" if "in the past" in str(exc) else "stage") from None
    return (await _customer_view(ctx, customer)).model_copy(update=_changed(result))


async def clear_schedule(ctx: AdminContext, call: Call) -> CustomerView:
    """Remove a customer's schedule."""
    customer, query = call.path_as(CustomerPath).customer, call.query_as(ChangeQuery)
    view = await _customer_view(ctx, customer)
    changes = []
    if view.schedule:
        entries = [(entry.at, entry.stage) for entry in view.schedule]
        changes = [clear_schedule_change(customer, entries)]
    if not query.dry_run:
        await ctx.flags.clear_schedule(customer, actor=query.actor, reason=query.reason)
        view = await _customer_view(ctx, customer)
    return view.model_copy(update={"dry_run": query.dry_run, "changes": changes})


async def history(ctx: AdminContext, call: Call) -> HistoryView:
    """The audit log."""
    query = call.query_as(HistoryQuery)
    entries = await ctx.flags.history(limit=query.limit, customer=query.customer)
    return HistoryView(entries=entries)


FLAG_ENDPOINTS = (
    Endpoint("GET", "/flags", list_flags, "Every flag", FlagsView),
    Endpoint("GET", "/flags/default", get_default, "The default stage", DefaultView),
    Endpoint(
        "PUT",
        "/flags/default",
        set_default,
        "Set the default stage",
        DefaultView,
        query=DryRunQuery,
        body=StageChange,
    ),
    Endpoint("GET", "/flags/kill", get_kill, "The kill switch", KillView),
    Endpoint(
        "PUT",
        "/flags/kill",
        set_kill,
        "Turn the kill switch on or off",
        KillView,
        query=DryRunQuery,
        body=KillChange,
    ),
    Endpoint("GET", "/flags/rollout", get_rollout, "The rollout percentages", RolloutView),
    Endpoint(
        "PUT",
        "/flags/rollout",
        set_rollout,
        "Set one stage's rollout percentage",
        RolloutView,
        query=DryRunQuery,
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
        query=DryRunQuery,
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
        query=DryRunQuery,
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
