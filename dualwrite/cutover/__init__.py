"""Cutover operations: move customers between stages, at billing-period boundaries, and back.

* ``CutoverOps``: percentage rollouts (only ever adding customers), named cohorts, cutovers at a
  customer's period end (with the Stripe subscription schedule that moves its item to the
  meter-backed price at that instant), rollbacks of one customer or everyone (one stage at a time
  unless forced; never below ``primary`` once the item left the legacy price, a pending price move
  released first: ``_rollback``, ``_prices``), and the kill switch, which also cancels pending
  cutovers. Every operation has a dry run returning exactly the flag changes and Stripe calls it
  would make, and writes each change to the flag audit log with its actor and reason.
* ``Guard``: rolls customers (or the whole rollout) back when divergence crosses the guardrails
  (``[guardrails]`` in the config); runs inside ``dualwrite worker`` and as ``dualwrite guard``.
"""

from __future__ import annotations

from dualwrite.cutover._cohorts import (
    STAGE_ORDER,
    At,
    CutoverInputError,
    check_move,
    next_stage,
    parse_at,
    parse_customers,
    parse_percent,
    parse_stage,
    previous_stage,
    read_cohort_file,
)
from dualwrite.cutover._flagops import clear_override, schedule_stage, set_default
from dualwrite.cutover._guard import GUARD_ACTOR, Guard
from dualwrite.cutover._models import (
    CustomerTrip,
    FlagChange,
    GuardResult,
    OperationResult,
    StripeCall,
)
from dualwrite.cutover._ops import CutoverOps
from dualwrite.cutover._stripe import CutoverStripe, CutoverStripeError, plan_schedule

__all__ = [
    "GUARD_ACTOR",
    "STAGE_ORDER",
    "At",
    "CustomerTrip",
    "CutoverInputError",
    "CutoverOps",
    "CutoverStripe",
    "CutoverStripeError",
    "FlagChange",
    "Guard",
    "GuardResult",
    "OperationResult",
    "StripeCall",
    "check_move",
    "clear_override",
    "next_stage",
    "parse_at",
    "parse_customers",
    "parse_percent",
    "parse_stage",
    "plan_schedule",
    "previous_stage",
    "read_cohort_file",
    "schedule_stage",
    "set_default",
]
