"""Field reading and event building: how a matched usage request becomes a ``UsageEvent``.

``build_event`` reads each event field from where the route says (path, query, json, form, header
or a constant) and refuses anything doubtful with a ``UsageInputError`` naming the request-side
field, as Stripe does. No other exception escapes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from pydantic import ValidationError

from dualwrite.config import FieldSource, ItemMapping, UsageRoute
from dualwrite.exceptions import FutureTimestampError, UsageInputError
from dualwrite.models import MAX_METER_VALUE, Action, IdentifierSource, UsageEvent, mint_identifier
from dualwrite.routes._match import RouteMatch

__all__ = [
    "EVENT_FIELDS",
    "FIELD_PARSERS",
    "IDEMPOTENCY_HEADER",
    "MAX_FUTURE_SECONDS",
    "build_event",
    "pydantic_message",
]

#: Both Stripe paths refuse usage stamped more than five minutes ahead of their clock.
MAX_FUTURE_SECONDS: Final = 300
#: The header whose value becomes the event identifier when the route configures no identifier.
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
#: The event fields a route may source, in reading order (the identifier last).
EVENT_FIELDS: Final = (
    "customer",
    "event_name",
    "subscription_item",
    "quantity",
    "timestamp",
    "action",
    "identifier",
)

_MISSING = "parameter_missing"
_INTEGER = "parameter_invalid_integer"
_INVALID = "parameter_invalid"
_FORM_TYPE = "application/x-www-form-urlencoded"
_SHOW_MAX = 40
_NO_ITEMS: Mapping[str, ItemMapping] = MappingProxyType({})


def build_event(
    match: RouteMatch,
    *,
    query_string: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    now: int,
    items: Mapping[str, ItemMapping] = _NO_ITEMS,
) -> UsageEvent:
    """Turn a matched usage request into a ``UsageEvent``, reading each field from its source.

    ``now`` is the instant fixed at intercept: it stands for an absent timestamp or ``"now"``.
    ``items`` supplies the customer and meter event name of known subscription items.

    Raises:
        UsageInputError: a field is missing, malformed, ambiguous or out of range; ``param`` names
            it as the request spells it and ``code`` is Stripe's (``parameter_missing``,
            ``parameter_invalid_integer`` or ``parameter_invalid``).
    """
    route = match.route
    request = _Request(match, query_string, headers, body)
    values: dict[str, Any] = {}
    params: dict[str, str] = {}
    for field in EVENT_FIELDS[:-1]:
        source: FieldSource | None = getattr(route, field)
        params[field] = field if source is None or source.kind == "const" else source.name
        raw = None if source is None else request.read(source, field)
        if raw is not None:
            values[field] = FIELD_PARSERS[field](raw, params[field])
    if "quantity" not in values:
        raise _missing(params["quantity"])
    raw_timestamp = values.get("timestamp", "now")
    timestamp = _timestamp(raw_timestamp, params["timestamp"], now)
    _apply_item_mapping(values, params, items)
    identifier, identifier_source = _identifier(route, request, params)
    try:
        return UsageEvent(
            identifier=identifier,
            customer=values["customer"],
            event_name=values["event_name"],
            subscription_item=values.get("subscription_item"),
            quantity=values["quantity"],
            timestamp=timestamp,
            action=values.get("action", route.default_action),
            identifier_source=identifier_source,
            timestamp_source="intercept" if raw_timestamp == "now" else "request",
        )
    except ValidationError as exc:
        field, message = pydantic_message(exc)
        param = params.get(field, field)
        code = _INTEGER if field in {"quantity", "timestamp"} else _INVALID
        raise UsageInputError(f"{param} is invalid: {message}", param=param, code=code) from None


def _apply_item_mapping(
    values: dict[str, Any], params: dict[str, str], items: Mapping[str, ItemMapping]
) -> None:
    item = values.get("subscription_item")
    mapping = items.get(item) if item is not None else None
    for field in ("customer", "event_name"):
        given = values.get(field)
        if mapping is not None:
            mapped: str = getattr(mapping, field)
            if given is None:
                values[field] = mapped
                params[field] = params["subscription_item"]
            elif given != mapped:
                msg = (
                    f"{params[field]} {_show(given)} contradicts subscription item "
                    f"{_show(item)}, which belongs to {field} {_show(mapped)}"
                )
                raise UsageInputError(msg, param=params[field], code=_INVALID)
        elif given is None:
            hint = f" (subscription item {_show(item)} has no [items] mapping)" if item else ""
            raise _missing(params[field], hint)


def _identifier(
    route: UsageRoute, request: _Request, params: dict[str, str]
) -> tuple[str, IdentifierSource]:
    source = route.identifier
    if source is not None:
        params["identifier"] = source.name
        raw = request.read(source, "identifier")
        if raw is not None:
            if source.kind == "header" and source.name.lower() == IDEMPOTENCY_HEADER.lower():
                return _identifier_text(raw, source.name), "idempotency_key"
            return _identifier_text(raw, source.name), "field"
    key = request.header(IDEMPOTENCY_HEADER)
    if key is not None:
        params["identifier"] = IDEMPOTENCY_HEADER
        return key, "idempotency_key"
    return mint_identifier(), "minted"


class _Request:
    """One request's raw parts, each decoded only when a field first reads it."""

    __slots__ = ("_body", "_form", "_header_list", "_headers", "_json", "_match", "_qs", "_query")

    def __init__(
        self,
        match: RouteMatch,
        query_string: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        self._match = match
        self._qs = query_string
        self._header_list = headers
        self._body = body
        self._query: dict[bytes, list[bytes]] | None = None
        self._form: dict[bytes, list[bytes]] | None = None
        self._json: dict[str, Any] | None = None
        self._headers: dict[bytes, list[bytes]] | None = None

    def read(self, source: FieldSource, field: str) -> Any:
        """The raw value at ``source`` (``None`` when absent), or a refusal naming it."""
        kind, name = source.kind, source.name
        if kind == "path":
            return self._match.path_params.get(name)
        if kind == "const":
            return name
        if kind == "header":
            return self.header(name)
        if kind == "json":
            return self._json_value(name)
        if kind == "query":
            if self._query is None:
                self._query = _split_pairs(self._qs)
            return _one_pair(self._query, name, "query string")
        if self._form is None:
            self._form = _split_pairs(self._checked_body(name, form=True))
        return _one_pair(self._form, name, "form body")

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or ``None``; refused when sent twice."""
        if self._headers is None:
            self._headers = {}
            for key, value in self._header_list:
                self._headers.setdefault(key.lower(), []).append(value)
        values = self._headers.get(name.lower().encode("latin-1", "replace"))
        if values is None:
            return None
        if len(values) > 1:
            raise _ambiguous(name, len(values), "headers")
        return values[0].decode("latin-1").strip(" \t")

    def _checked_body(self, param: str, *, form: bool) -> bytes:
        limit = self._match.route.max_body_bytes
        if len(self._body) > limit:
            msg = f"the request body is larger than {limit} bytes (needed for {param})"
            raise UsageInputError(msg, param=param, code=_INVALID)
        content_type = self.header("content-type") if form else None
        if content_type and content_type.split(";")[0].strip().lower() != _FORM_TYPE:
            msg = f"{param} is read from the form body, which must be {_FORM_TYPE}"
            raise UsageInputError(msg, param=param, code=_INVALID)
        return self._body

    def _json_value(self, name: str) -> Any:
        if self._json is None:
            self._json = _parse_json(self._checked_body(name, form=False), name)
        node: Any = self._json
        parts = name.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict):
                parent = ".".join(parts[:depth])
                msg = f"{parent} must be a JSON object to hold {name}, not {_kind(node)}"
                raise UsageInputError(msg, param=name, code=_INVALID)
            node = node.get(part)
            if node is _DUPLICATE:
                msg = f"{'.'.join(parts[: depth + 1])} appears more than once in the JSON body"
                raise UsageInputError(msg, param=name, code=_INVALID)
            if node is None:
                return None
        return node


_DUPLICATE = object()


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        result[key] = _DUPLICATE if key in result else value
    return result


def _refuse_constant(name: str) -> Any:
    msg = f"{name} is not JSON"
    raise ValueError(msg)


def _parse_json(body: bytes, param: str) -> dict[str, Any]:
    if not body:
        return {}
    try:
        data = json.loads(body, object_pairs_hook=_json_object, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        msg = f"the request body is not valid JSON (needed for {param})"
        raise UsageInputError(msg, param=param, code=_INVALID) from None
    if not isinstance(data, dict):
        msg = f"the request body must be a JSON object (needed for {param}), not {_kind(data)}"
        raise UsageInputError(msg, param=param, code=_INVALID)
    return data


def _split_pairs(raw: bytes) -> dict[bytes, list[bytes]]:
    """``a=1&b=2`` as names (decoded) to raw values (decoded only when read)."""
    pairs: dict[bytes, list[bytes]] = {}
    for chunk in raw.split(b"&"):
        if chunk:
            name, _, value = chunk.partition(b"=")
            pairs.setdefault(unquote_to_bytes(name.replace(b"+", b" ")), []).append(value)
    return pairs


def _one_pair(pairs: dict[bytes, list[bytes]], name: str, where: str) -> str | None:
    values = pairs.get(name.encode("utf-8", "replace"))
    if values is None:
        return None
    if len(values) > 1:
        raise _ambiguous(name, len(values), where)
    try:
        return unquote_to_bytes(values[0].replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        msg = f"{name} in the {where} is not valid percent-encoded UTF-8"
        raise UsageInputError(msg, param=name, code=_INVALID) from None


def _whole_number(value: Any, param: str, *, limit: int | None) -> int:
    """A JSON integer (or integral float), or a string of ASCII digits, within ``0..limit``."""
    number: int | None = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        digits = value.lstrip("0")
        # More than 15 digits is out of range for every field; int() of thousands would raise.
        number = 10**15 if len(digits) > 15 else int(digits or "0")
    if number is None:
        got = "an empty string" if value == "" else _show(value)
        msg = f"{param} must be a whole number, got {got}"
        raise UsageInputError(msg, param=param, code=_INTEGER)
    if number < 0:
        msg = f"{param} must not be negative, got {_show(value)}"
        raise UsageInputError(msg, param=param, code=_INTEGER)
    if limit is not None and number > limit:
        msg = f"{param} must be at most {limit} (15 digits), got {_show(value)}"
        raise UsageInputError(msg, param=param, code=_INTEGER)
    return number


def _quantity(value: Any, param: str) -> int:
    return _whole_number(value, param, limit=MAX_METER_VALUE)


def _timestamp_value(value: Any, param: str) -> int | str:
    return "now" if value == "now" else _whole_number(value, param, limit=None)


def _timestamp(value: int | str, param: str, now: int) -> int:
    if isinstance(value, str):
        return now
    if value <= 0:
        msg = f"{param} must be a positive Unix timestamp in seconds or 'now', got {_show(value)}"
        raise UsageInputError(msg, param=param, code=_INTEGER)
    if value > now + MAX_FUTURE_SECONDS:
        msg = f"{param} is more than {MAX_FUTURE_SECONDS} seconds in the future ({_show(value)})"
        raise FutureTimestampError(msg, param=param, code=_INVALID)
    return value


def _action(value: Any, param: str) -> Action:
    if value == "increment":
        return "increment"
    if value == "set":
        return "set"
    msg = f"{param} must be 'increment' or 'set', got {_show(value)}"
    raise UsageInputError(msg, param=param, code=_INVALID)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        msg = f"{param} must be a string, not {_kind(value)}"
        raise UsageInputError(msg, param=param, code=_INVALID)
    return value


def _identifier_text(value: Any, param: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value, param)


#: Each sourced field's parser: raw value and request-side name in, checked value out.
FIELD_PARSERS: dict[str, Callable[[Any, str], object]] = {
    "customer": _text,
    "event_name": _text,
    "subscription_item": _text,
    "quantity": _quantity,
    "timestamp": _timestamp_value,
    "action": _action,
}


def pydantic_message(exc: ValidationError) -> tuple[str, str]:
    """The first failing event field and a short reason (never the whole offending value)."""
    error = exc.errors(include_url=False)[0]
    field = str(error["loc"][0]) if error["loc"] else "event"
    reason = error["msg"].removeprefix("Value error, ")
    return field, f"{reason} (got {_show(error.get('input'))})"


def _missing(param: str, hint: str = "") -> UsageInputError:
    return UsageInputError(f"{param} is required{hint}", param=param, code=_MISSING)


def _ambiguous(name: str, count: int, where: str) -> UsageInputError:
    msg = f"{name} appears {count} times in the {where}; send it once"
    return UsageInputError(msg, param=name, code=_INVALID)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _show(value: Any) -> str:
    """``repr`` of a scalar, cut to about 40 characters; containers are only named."""
    if not isinstance(value, str | int | float):
        return _kind(value)
    try:
        text = repr(value)
    except ValueError:  # an int too long for str(): sys.get_int_max_str_digits()
        return "a number too long to show"
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."
