"""The reconciliation records of the admin API: what ``dualwrite reconcile`` (``--money``) stored.

======  ======================================  ===============================================
GET     ``/reconciliation``                     records, newest period first: each leg's totals
                                                at Stripe, the drift and (``--money``) what each
                                                leg's price bills, to the cent
======  ======================================  ===============================================
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dualwrite.admin._api import AdminContext, Call, Endpoint
from dualwrite.admin._flag_models import CUSTOMER_PATTERN
from dualwrite.reconcile import PeriodChoice, ReconciliationRecord, read_reconciliation

__all__ = ["RECONCILE_ENDPOINTS"]


class ReconciliationQuery(BaseModel):
    """Which records to list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    customer: str | None = Field(
        default=None, pattern=CUSTOMER_PATTERN, description="Only this customer."
    )
    period: str | None = Field(
        default=None,
        pattern=r"^([0-9]{8}T[0-9]{6}Z/[0-9]{8}T[0-9]{6}Z|[0-9]{4}-[0-9]{2}-[0-9]{2})$",
        description="A billing period id (20261101T000000Z/20261201T000000Z), or a date: every "
        "period holding that UTC day.",
    )
    limit: int = Field(default=100, ge=1, le=10_000, description="At most this many records.")

    @field_validator("period")
    @classmethod
    def _a_period(cls, value: str | None) -> str | None:
        if value is not None:
            PeriodChoice.parse(value)  # a ValueError names what to write
        return value


class ReconciliationView(BaseModel):
    """Stored reconciliation records, newest period first."""

    model_config = ConfigDict(frozen=True)

    records: list[ReconciliationRecord]
    money_differs: int
    """How many of them bill differently on the two paths (beyond ``[report]
    readiness_max_money_difference``), in another currency, or otherwise than Stripe's preview."""


async def reconciliation(ctx: AdminContext, call: Call) -> ReconciliationView:
    """The records ``dualwrite reconcile`` stored."""
    query = call.query_as(ReconciliationQuery)
    found = await read_reconciliation(
        ctx.redis, ctx.keys, customer=query.customer, period=query.period
    )
    records = list(reversed(found))[: query.limit]
    tolerance = ctx.settings.report.readiness_max_money_difference
    differs = sum(1 for record in records if record.bills_differently(tolerance))
    return ReconciliationView(records=records, money_differs=differs)


RECONCILE_ENDPOINTS = (
    Endpoint(
        "GET",
        "/reconciliation",
        reconciliation,
        "Reconciliation records (dualwrite reconcile): Stripe's totals, drift and invoices",
        ReconciliationView,
        query=ReconciliationQuery,
        tag="reconcile",
    ),
)
