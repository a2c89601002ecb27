"""The cutover operations of the admin API: ``dualwrite rollout|cutover|rollback|guard`` as JSON.

====  =================================  =========================================================
POST  ``/rollout``                       a percentage, or named customers, one stage forward
POST  ``/customers/{customer}/cutover``  one customer to a stage at its period end, now or a time
POST  ``/rollback``                      named customers (or ``all``) back, at once
POST  ``/guard``                         one guard pass over the guardrails
====  =================================  =========================================================

Each runs ``dualwrite.cutover.CutoverOps`` on the API's Redis, with the CLI's options as JSON
fields (``dry_run``, ``force``, ``actor``, ``reason``), read by the cutover package's own parsers:
the same input is accepted and refused with the same messages as on the command line (which name
options as ``--to``, ``--at``, ``--force``: the JSON fields ``to``, ``at``, ``force``). A refusal is
400 with ``param`` and changes nothing; Stripe refusing (or unreachable) is 502 ``api_error`` with
Stripe's status, code and message, and no flag changed.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dualwrite.admin._api import AdminContext, ApiError, Call, Endpoint
from dualwrite.admin._flag_models import CustomerPath, _Change, _Input
from dualwrite.cutover import (
    CutoverInputError,
    CutoverOps,
    CutoverStripeError,
    GuardResult,
    OperationResult,
    parse_at,
    parse_customers,
    parse_percent,
    parse_stage,
)
from dualwrite.models import Stage
from dualwrite.redaction import redact

__all__ = ["COHORT_BODY_BYTES", "CUTOVER_ENDPOINTS"]

#: The largest body of a cohort operation: about 100,000 ids like ``cus_…`` (the cohort limit).
COHORT_BODY_BYTES = 4 * 1024 * 1024
_LATEST = 2**40  # the flag store's bound on a schedule's Unix time
_OPTION = re.compile(r"^(?:unknown )?--([a-z][a-z-]*)")


def _stage(value: object, what: str = "stage") -> object:
    """A stage name as the CLI reads it (case and blanks forgiven), or its refusal."""
    return parse_stage(value, what=what) if isinstance(value, str) else value


def _cohort(value: object) -> object:
    """A list of ids as ``--customers`` reads them (entries may be comma-separated), or None."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(entry, str) for entry in value):
        raise ValueError('customers is a list of customer ids: ["cus_a", "cus_b"]')
    return parse_customers(",".join(value))


class _Move(_Change):
    force: bool = Field(default=False, description="Allow moves other than one stage forward.")
    dry_run: bool = Field(
        default=False, description="Return exactly what would change (and the Stripe calls)."
    )


class RolloutRequest(_Move):
    """A percentage rollout (``percent``) or a named cohort (``customers``) to ``stage``."""

    # Exactly one of the two, said in the document as the handler enforces it.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                for name in ("percent", "customers")
            ]
        }
    )

    stage: Stage = Field(description="shadow, primary or meter (legacy only for a cohort).")
    percent: float | str | None = Field(
        default=None,
        description='Share of all customers: 25, 12.5 or "25%" (0 to 100, two decimals).',
    )
    customers: list[str] | None = Field(
        default=None,
        description="Customer ids, pinned by override (an entry may hold several, comma-separated).",
    )

    @field_validator("stage", mode="before")
    @classmethod
    def _parse_stage(cls, value: object) -> object:
        return _stage(value)

    @field_validator("percent", mode="before")
    @classmethod
    def _parse_percent(cls, value: object) -> object:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError('a percentage is a number (12.5) or a string ("25%")')
        return parse_percent(value)

    @field_validator("customers", mode="before")
    @classmethod
    def _parse_customers(cls, value: object) -> object:
        return _cohort(value)


class CutoverRequest(_Move):
    """Move the customer to ``to`` at ``at``, optionally with the Stripe subscription schedule."""

    to: Stage = Field(description="The stage to move to (one forward unless force).")
    at: str | int = Field(
        default="period-end",
        description=(
            "period-end (the subscription's current_period_end, read from Stripe), now, Unix "
            "seconds, or an ISO 8601 time (UTC unless it says)."
        ),
    )
    with_schedule: bool = Field(
        default=False,
        description=(
            "With to=primary and at=period-end: also create the Stripe subscription schedule "
            "moving the legacy item to price at the same instant."
        ),
    )
    price: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_\-]{1,255}$",
        description="The meter-backed price (with with_schedule).",
    )

    @field_validator("to", mode="before")
    @classmethod
    def _parse_to(cls, value: object) -> object:
        return _stage(value, "--to stage")

    @field_validator("at", mode="before")
    @classmethod
    def _parse_at(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("at is period-end, now, Unix seconds or an ISO 8601 time")
        at = parse_at(str(value))
        if isinstance(at, int) and at >= _LATEST:
            raise ValueError(f"--at {value!r} is too far ahead; give a time before {_LATEST}")
        return at


class RollbackRequest(_Change):
    """Named customers back (pinned by override, schedules cleared), or everyone with ``all``."""

    customers: list[str] | None = Field(default=None, description="Customer ids to roll back.")
    all: bool = Field(
        default=False, description="Everyone: rollouts, default, overrides and schedules."
    )
    to: Stage | None = Field(
        default=None,
        description="The stage to go back to (default: one stage back; with all: legacy).",
    )
    force: bool = Field(
        default=False,
        description=(
            "Allow moving customers more than one stage back at once. Never takes a customer "
            "whose item left the legacy price below primary."
        ),
    )
    dry_run: bool = Field(default=False, description="Return exactly what would change.")

    @field_validator("to", mode="before")
    @classmethod
    def _parse_to(cls, value: object) -> object:
        return _stage(value, "--to stage")

    @field_validator("customers", mode="before")
    @classmethod
    def _parse_customers(cls, value: object) -> object:
        return _cohort(value)


class GuardRequest(_Input):
    """One guard pass."""

    dry_run: bool = Field(default=False, description="Report the trips; roll nothing back.")


# -- errors --------------------------------------------------------------------------------------


def _refusal(exc: CutoverInputError, model: type[BaseModel], default: str | None) -> ApiError:
    """400 with the operation's message; ``param`` is the option it names, else ``default``."""
    message = str(exc)
    named = _OPTION.match(message)
    field = named.group(1).replace("-", "_") if named else None
    if "STRIPE_API_KEY" in message:
        field = "at"  # reading the period end needs the key; at=now or a time does not
    return ApiError(400, message, param=field if field in model.model_fields else default)


def _stripe_failure(exc: CutoverStripeError) -> ApiError:
    """502 when Stripe refused a call or could not be reached; 400 (``at``) when Stripe answered
    but the customer has no single period end to cut over at."""
    if exc.failure is None:
        return ApiError(400, str(exc), param="at")
    return ApiError(502, redact(str(exc)), error_type="api_error", code="stripe_error")


def _ops(ctx: AdminContext) -> CutoverOps:
    return CutoverOps(ctx.redis, ctx.keys, ctx.settings, clock=ctx.clock)


# -- handlers ------------------------------------------------------------------------------------


async def rollout(ctx: AdminContext, call: Call) -> OperationResult:
    """A percentage rollout or a named cohort, one stage forward."""
    body = call.body_as(RolloutRequest)
    if (body.percent is None) == (body.customers is None):
        raise ApiError(400, "give exactly one of percent or customers", param="percent")
    percent = float(body.percent) if body.percent is not None else None
    try:
        return await _ops(ctx).rollout(
            body.stage,
            percent=percent,
            customers=body.customers,
            actor=body.actor,
            reason=body.reason,
            force=body.force,
            dry_run=body.dry_run,
        )
    except CutoverInputError as exc:
        default = "customers" if percent is None else "percent"
        if percent is not None and body.stage is Stage.LEGACY:
            default = "stage"  # no percentage rollout to legacy
        raise _refusal(exc, RolloutRequest, default) from None


async def cutover(ctx: AdminContext, call: Call) -> OperationResult:
    """One customer to a stage at its period end, now or a given time."""
    customer, body = call.path_as(CustomerPath).customer, call.body_as(CutoverRequest)
    at: Any = body.at  # parse_at's result: "period-end", "now" or Unix seconds
    try:
        return await _ops(ctx).cutover(
            customer,
            body.to,
            at=at,
            actor=body.actor,
            reason=body.reason,
            force=body.force,
            with_schedule=body.with_schedule,
            price=body.price,
            dry_run=body.dry_run,
        )
    except CutoverInputError as exc:
        default = "with_schedule" if body.with_schedule else "to"
        raise _refusal(exc, CutoverRequest, default) from None
    except CutoverStripeError as exc:
        raise _stripe_failure(exc) from None


async def rollback(ctx: AdminContext, call: Call) -> OperationResult:
    """Named customers, or everyone, back at once."""
    body = call.body_as(RollbackRequest)
    if bool(body.customers) == body.all:
        raise ApiError(400, "give customers, or all: true (not both)", param="customers")
    ops = _ops(ctx)
    try:
        if body.all:
            return await ops.rollback_all(
                to=body.to or Stage.LEGACY,
                actor=body.actor,
                reason=body.reason,
                force=body.force,
                dry_run=body.dry_run,
            )
        return await ops.rollback(
            body.customers or [],
            to=body.to,
            actor=body.actor,
            reason=body.reason,
            force=body.force,
            dry_run=body.dry_run,
        )
    except CutoverInputError as exc:
        raise _refusal(exc, RollbackRequest, "to") from None
    except CutoverStripeError as exc:
        raise _stripe_failure(exc) from None


async def guard(ctx: AdminContext, call: Call) -> GuardResult:
    """One guard pass."""
    return await _ops(ctx).guard_once(dry_run=call.body_as(GuardRequest).dry_run)


CUTOVER_ENDPOINTS = (
    Endpoint(
        "POST",
        "/rollout",
        rollout,
        "Move a percentage of customers, or named ones, one stage forward",
        OperationResult,
        body=RolloutRequest,
        tag="cutover",
        max_body=COHORT_BODY_BYTES,
    ),
    Endpoint(
        "POST",
        "/customers/{customer}/cutover",
        cutover,
        "Move a customer to a stage at its billing period's end (or now, or a given time)",
        OperationResult,
        path_params=CustomerPath,
        body=CutoverRequest,
        tag="cutover",
        errors=(409, 502),
    ),
    Endpoint(
        "POST",
        "/rollback",
        rollback,
        "Send customers (or everyone) back: pinned by override, schedules cleared",
        OperationResult,
        body=RollbackRequest,
        tag="cutover",
        max_body=COHORT_BODY_BYTES,
        errors=(502,),
    ),
    Endpoint(
        "POST",
        "/guard",
        guard,
        "One guard pass: roll back customers (or the rollout) over the guardrails",
        GuardResult,
        body=GuardRequest,
        tag="cutover",
    ),
)
