"""The divergence log: every event whose two legs disagree, one stream entry each, both legs' Stripe
ids and errors included. Entries are appended by the script that counts the event in the ledger
(``ledger_update()``'s divergence entry); ``Ledger.divergences`` reads them back."""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from dualwrite.models import Stage, StripeFailure, UsageEvent, WriteResult

__all__ = [
    "DivergenceKind",
    "DivergenceRecord",
    "LegView",
    "describe_failure",
    "divergence_fields",
]

DivergenceKind = Literal["shadow_refused", "shadow_expired", "translated", "late_refusal"]
"""Why an event's legs disagree: the shadow was refused for good, it expired in the outbox, a ``set``
was translated, or Stripe refused a meter event after accepting it."""


class LegView(BaseModel):
    """One leg's side of a divergent event."""

    model_config = ConfigDict(frozen=True)

    status: Literal["accepted", "refused", "expired", "not_written", "pending"]
    stripe_id: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, result: WriteResult) -> LegView:
        """The view of a completed write."""
        if result.accepted:
            return cls(status="accepted", stripe_id=result.stripe_id)
        return cls(status="refused", error=describe_failure(result.failure))


def describe_failure(failure: StripeFailure | None) -> str | None:
    """``status code: message`` for logs and the divergence log."""
    if failure is None:
        return None
    code = failure.code or failure.type
    return f"{failure.http_status or 'network'} {code}: {failure.message}"


def divergence_fields(
    event: UsageEvent,
    *,
    kind: DivergenceKind,
    stage: Stage,
    legacy: LegView,
    meter: LegView,
    note: str = "",
    at: float | None = None,
) -> dict[str, str]:
    """The stream fields of one divergence entry, both legs' Stripe ids and errors included."""
    return {
        "at": f"{at if at is not None else time.time():.3f}",
        "kind": kind,
        "identifier": event.identifier,
        "customer": event.customer,
        "event_name": event.event_name,
        "period": event.period,
        "stage": stage.value,
        "quantity": str(event.quantity),
        "action": event.action,
        "subscription_item": event.subscription_item or "",
        "legacy": legacy.model_dump_json(),
        "meter": meter.model_dump_json(),
        "note": note,
    }


class DivergenceRecord(BaseModel):
    """One entry of the divergence log."""

    model_config = ConfigDict(frozen=True)

    id: str
    at: float
    kind: str
    identifier: str
    customer: str
    event_name: str
    period: str
    stage: str
    quantity: int
    action: str
    subscription_item: str | None
    legacy: LegView
    meter: LegView
    note: str

    @classmethod
    def from_stream(cls, entry_id: str, fields: dict[str, str]) -> DivergenceRecord:
        """Parse one stream entry."""
        return cls(
            id=entry_id,
            at=float(fields.get("at", 0)),
            kind=fields.get("kind", ""),
            identifier=fields.get("identifier", ""),
            customer=fields.get("customer", ""),
            event_name=fields.get("event_name", ""),
            period=fields.get("period", ""),
            stage=fields.get("stage", ""),
            quantity=int(fields.get("quantity", 0)),
            action=fields.get("action", ""),
            subscription_item=fields.get("subscription_item") or None,
            legacy=LegView.model_validate(json.loads(fields.get("legacy", "{}") or "{}")),
            meter=LegView.model_validate(json.loads(fields.get("meter", "{}") or "{}")),
            note=fields.get("note", ""),
        )
