"""What a committed event leaves for its caller's retries: a digest of the usage and a compact
outcome, from which the full ``RecordOutcome`` (and so the reply) is rebuilt (issue 20).

A caller's retry carries the same usage as its first attempt (the fingerprint says so), so the
record need not hold the event: only what Stripe and dualwrite decided. The record is one Redis
string (a hash's fields cost more than their values):

    "2" + the fingerprint's first 12 hex digits + "|".join([
        codes     stage, authoritative leg, shadow leg ("-": none), shadow status, flags (digit)
        http      Stripe's status ("" none)
        id        the Stripe id ("" none, "~" the event's meter identifier)
        ts        the timestamp, only when it was fixed at intercept (a retry's differs)
        value     the quantity the authoritative leg carried ("=": the event's, "" none)
        response  "U<livemode>" a usage record, "M<livemode><created - timestamp>" a meter event,
                  both rebuilt from the event; "" none; "J" in the extra JSON
        extra     JSON of what has no short form (a failure, an unusual response), "" none
    ])

About 60 bytes for a usage record, where the JSON outcome took ~680. Records written before this
format (a hash holding the JSON outcome, or a JSON string from a spooled commit) still read: the
JSON holds the whole outcome, event included.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from dualwrite.models import Leg, RecordOutcome, ShadowStatus, Stage, UsageEvent, WriteResult

__all__ = [
    "FINGERPRINT_CHARS",
    "VERSION",
    "decode",
    "encode",
    "fingerprint_of",
    "is_legacy_json",
    "matches",
]

T = TypeVar("T")

#: The first character of a record in this format.
VERSION = "2"
#: Hex digits of the usage's fingerprint kept (48 bits: a reused identifier with other usage is
#: told apart but for a 2**-48 chance).
FINGERPRINT_CHARS = 12

_STAGES = {Stage.LEGACY: "l", Stage.SHADOW: "s", Stage.PRIMARY: "p", Stage.METER: "m"}
_LEGS = {Leg.LEGACY: "l", Leg.METER: "m"}
_STATUSES: dict[ShadowStatus, str] = {
    "enqueued": "e",
    "spooled": "s",
    "not_applicable": "n",
    "skipped": "k",
    "enqueue_failed": "f",
}
_ACCEPTED, _TRANSLATED, _REPLAYED = 1, 2, 4
_CUSTOMER_KEY, _VALUE_KEY = "stripe_customer_id", "value"
#: In the id field: the event's own meter identifier (what a meter write's id is).
_METER_IDENTIFIER = "~"


def fingerprint_of(event: UsageEvent) -> str:
    """The part of the usage's fingerprint a record keeps."""
    return event.fingerprint()[:FINGERPRINT_CHARS]


def is_legacy_json(record: str) -> bool:
    """Whether ``record`` is a whole outcome as JSON (the format before this one)."""
    return record.startswith("{")


def encode(outcome: RecordOutcome) -> str:
    """The record of ``outcome``: its usage's fingerprint and the compact outcome."""
    event, result = outcome.event, outcome.authoritative
    extra: dict[str, Any] = {}
    flags = (
        (_ACCEPTED if result.accepted else 0)
        | (_TRANSLATED if outcome.translated else 0)
        | (_REPLAYED if outcome.replayed else 0)
    )
    codes = (
        _STAGES[outcome.stage]
        + _LEGS[result.leg]
        + (_LEGS[outcome.shadow_leg] if outcome.shadow_leg else "-")
        + _STATUSES[outcome.shadow_status]
        + str(flags)
    )
    stripe_id = result.stripe_id or ""
    if result.stripe_id == event.meter_identifier:
        stripe_id = _METER_IDENTIFIER
    elif result.stripe_id is not None and not _plain(result.stripe_id):
        extra["stripe_id"], stripe_id = result.stripe_id, ""
    value = {None: "", event.quantity: "="}.get(result.value, str(result.value))
    response = _response_code(result, event)
    if response == "J":
        extra["response"] = result.response
    if result.failure is not None:
        extra["failure"] = result.failure.model_dump(mode="json", exclude_defaults=True)
    fields = [
        codes,
        "" if result.http_status is None else str(result.http_status),
        stripe_id,
        str(event.timestamp) if event.timestamp_source == "intercept" else "",
        value,
        response,
        json.dumps(extra, separators=(",", ":")) if extra else "",
    ]
    return VERSION + fingerprint_of(event) + "|".join(fields)


def decode(record: str, event: UsageEvent) -> RecordOutcome:
    """The outcome ``record`` keeps, for ``event`` (the retry: the same usage as the first time).

    Raises:
        ValueError: ``record`` is in no format this version reads.
    """
    if is_legacy_json(record):
        return RecordOutcome.model_validate_json(record)
    if not record.startswith(VERSION):
        msg = f"unknown idempotency record format {record[:1]!r}"
        raise ValueError(msg)
    body = record[1 + FINGERPRINT_CHARS :]
    codes, http, stripe_id, ts, value, response_code, extra_json = body.split("|", 6)
    extra: dict[str, Any] = json.loads(extra_json) if extra_json else {}
    if ts:
        event = event.model_copy(update={"timestamp": int(ts)})
    stage = _decoded(_STAGES, codes[0])
    leg = _decoded(_LEGS, codes[1])
    flags = int(codes[4])
    carried = None if value == "" else event.quantity if value == "=" else int(value)
    if stripe_id == _METER_IDENTIFIER:
        stripe_id = event.meter_identifier
    stripe = extra.get("stripe_id", stripe_id or None)
    result = WriteResult(
        leg=leg,
        accepted=bool(flags & _ACCEPTED),
        stripe_id=stripe,
        http_status=int(http) if http else None,
        response=_rebuilt(response_code, extra, event, stripe, carried),
        failure=extra.get("failure"),
        value=carried,
    )
    return RecordOutcome(
        event=event,
        stage=stage,
        authoritative=result,
        shadow_leg=None if codes[2] == "-" else _decoded(_LEGS, codes[2]),
        shadow_status=_decoded(_STATUSES, codes[3]),
        replayed=bool(flags & _REPLAYED),
        translated=bool(flags & _TRANSLATED),
    )


def matches(record: str, event: UsageEvent) -> bool:
    """Whether ``record`` was left by the same usage as ``event`` (else: an identifier reused)."""
    if is_legacy_json(record):
        return RecordOutcome.model_validate_json(record).event.fingerprint() == event.fingerprint()
    return record[1 : 1 + FINGERPRINT_CHARS] == fingerprint_of(event)


def _plain(text: str) -> bool:
    return bool(text) and "|" not in text and text != _METER_IDENTIFIER


def _usage_record(event: UsageEvent, stripe_id: str | None, livemode: bool) -> dict[str, Any]:
    return {
        "id": stripe_id,
        "object": "usage_record",
        "livemode": livemode,
        "quantity": event.quantity,
        "subscription_item": event.subscription_item,
        "timestamp": event.timestamp,
    }


def _meter_event(
    event: UsageEvent, stripe_id: str | None, value: int | None, livemode: bool, created: int
) -> dict[str, Any]:
    return {
        "object": "billing.meter_event",
        "created": created,
        "event_name": event.event_name,
        "identifier": stripe_id,
        "livemode": livemode,
        "payload": {_CUSTOMER_KEY: event.customer, _VALUE_KEY: str(value)},
        "timestamp": event.timestamp,
    }


def _response_code(result: WriteResult, event: UsageEvent) -> str:
    """The short form of Stripe's reply when it is exactly what the event rebuilds, else "J"."""
    response = result.response
    if response is None:
        return ""
    livemode = response.get("livemode")
    if not isinstance(livemode, bool):
        return "J"
    flag = str(int(livemode))
    if _same(response, _usage_record(event, result.stripe_id, livemode)):
        return "U" + flag
    created = response.get("created")
    if type(created) is int and created >= 0:
        rebuilt = _meter_event(event, result.stripe_id, result.value, livemode, created)
        if _same(response, rebuilt):
            return "M" + flag + str(created - event.timestamp)
    return "J"


def _same(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Equal, key order included (the reply is serialised in that order)."""
    return json.dumps(first) == json.dumps(second)


def _rebuilt(
    code: str, extra: dict[str, Any], event: UsageEvent, stripe_id: str | None, value: int | None
) -> dict[str, Any] | None:
    if code == "":
        return None
    if code == "J":
        response: dict[str, Any] = extra["response"]
        return response
    livemode = code[1] == "1"
    if code[0] == "U":
        return _usage_record(event, stripe_id, livemode)
    if code[0] == "M":
        return _meter_event(event, stripe_id, value, livemode, event.timestamp + int(code[2:]))
    msg = f"unknown response code {code!r} in an idempotency record"
    raise ValueError(msg)


def _decoded(table: dict[T, str], code: str) -> T:
    for value, short in table.items():
        if short == code:
            return value
    msg = f"unknown code {code!r} in an idempotency record"
    raise ValueError(msg)
