"""Stripe's error-report events: verify a pushed thin event, fetch it whole, read its samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import stripe
from pydantic import BaseModel, ConfigDict

from dualwrite.exceptions import EventFetchError, EventSignatureError
from dualwrite.redaction import redact
from dualwrite.stripe_io._sdk import parse_event_notification, plain

__all__ = [
    "ERROR_REPORT_EVENT",
    "EventFetchError",
    "EventSignatureError",
    "MeterErrorReport",
    "MeterErrorSample",
    "fetch_error_report",
]

#: The thin event Stripe sends when meter events it had accepted fail validation.
ERROR_REPORT_EVENT = "v1.billing.meter.error_report_triggered"


class MeterErrorSample(BaseModel):
    """One sampled refusal: the meter event's identifier and Stripe's code and message."""

    model_config = ConfigDict(frozen=True)

    identifier: str
    code: str
    message: str


class MeterErrorReport(BaseModel):
    """The part of an error-report event dualwrite acts on."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    event_type: str
    error_count: int = 0
    samples: list[MeterErrorSample] = []


async def fetch_error_report(
    client: stripe.StripeClient, payload: bytes, signature: str | None, *, secret: str, api_key: str
) -> MeterErrorReport:
    """Verify a pushed thin event and, for an error report, fetch the whole event.

    Raises:
        EventSignatureError: the signature does not verify (or is missing).
        EventFetchError: fetching the event failed (answer 5xx, so that Stripe delivers it again).
    """
    try:
        notification = parse_event_notification(client, payload, signature, secret)
    except (stripe.SignatureVerificationError, ValueError) as exc:
        msg = f"the event's Stripe-Signature does not verify: {redact(str(exc))}"
        raise EventSignatureError(msg) from None
    report = MeterErrorReport(event_id=notification.id, event_type=notification.type)
    if notification.type != ERROR_REPORT_EVENT:
        return report
    event = await client.v2.core.events.retrieve_async(
        notification.id, options={"api_key": api_key}
    )
    data = _as_mapping(plain(event).get("data"))
    reason = _as_mapping(data.get("reason"))
    samples: list[MeterErrorSample] = []
    for error_type in reason.get("error_types") or []:
        kind = _as_mapping(error_type)
        for sample in kind.get("sample_errors") or []:
            item = _as_mapping(sample)
            identifier = _as_mapping(item.get("request")).get("identifier")
            if identifier:
                samples.append(
                    MeterErrorSample(
                        identifier=str(identifier),
                        code=str(kind.get("code") or "unknown"),
                        message=str(item.get("error_message") or ""),
                    )
                )
    return report.model_copy(
        update={"error_count": int(reason.get("error_count") or 0), "samples": samples}
    )


def _as_mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
