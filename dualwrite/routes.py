"""Usage routes: which requests of the user's app report usage, and how each becomes a UsageEvent.

``RouteTable`` answers "is this a usage request?" for every request the middleware sees, so a miss
is kept cheap: routes are indexed by method, and a path that starts with none of the routes' literal
prefixes is turned away by one ``str.startswith`` before any regular expression runs. Templates are
compiled by Starlette's own ``compile_path`` and matched the way Starlette's router matches them
(``GET`` routes also answer ``HEAD``; no trailing-slash folding), so the middleware sees exactly the
requests the app's handler would.

``build_event`` reads each event field from where the route says and refuses anything doubtful with
a ``UsageInputError`` naming the request-side field, as Stripe does. No other exception escapes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from pydantic import ValidationError
from starlette.convertors import CONVERTOR_TYPES
from starlette.routing import PARAM_REGEX, compile_path

from dualwrite.config import FieldSource, ItemMapping, UsageRoute
from dualwrite.exceptions import ConfigError, UsageInputError
from dualwrite.models import MAX_METER_VALUE, Action, IdentifierSource, UsageEvent, mint_identifier

__all__ = ["IDEMPOTENCY_HEADER", "MAX_FUTURE_SECONDS", "RouteMatch", "RouteTable", "build_event"]

#: Both Stripe paths refuse usage stamped more than five minutes ahead of their clock.
MAX_FUTURE_SECONDS: Final = 300
#: The header whose value becomes the event identifier when the route configures no identifier.
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"

_MISSING = "parameter_missing"
_INTEGER = "parameter_invalid_integer"
_INVALID = "parameter_invalid"
_FORM_TYPE = "application/x-www-form-urlencoded"
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SHOW_MAX = 40
_NO_ITEMS: Mapping[str, ItemMapping] = MappingProxyType({})
_EVENT_FIELDS = (
    "customer",
    "event_name",
    "subscription_item",
    "quantity",
    "timestamp",
    "action",
    "identifier",
)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A request that matched a usage route, with its path parameters as raw (unconverted) text."""

    route: UsageRoute
    path_params: dict[str, str]


_Entry = tuple[str, re.Pattern[str], UsageRoute]
"""A compiled route: its literal prefix (checked before the regex), its regex and the route."""


class RouteTable:
    """The configured usage routes, compiled once; ``match`` finds the route a request belongs to.

    Routes are tried in configuration order and the first match wins. Methods are compared exactly
    (HTTP methods are case-sensitive and ASGI delivers them upper-case); ``path`` is the ASGI route
    path (``scope["path"]`` without ``root_path``), already percent-decoded.

    Raises:
        ConfigError: a template uses an unknown convertor or repeats a parameter, a field reads a
            path parameter the template lacks, a route mixes JSON and form sources, or a constant
            is not a valid value for its field.
    """

    __slots__ = ("_by_method", "_routes")

    def __init__(self, routes: Sequence[UsageRoute]) -> None:
        by_method: dict[str, list[_Entry]] = {}
        for route in routes:
            entry = _compile(route)
            methods = (route.method, "HEAD") if route.method == "GET" else (route.method,)
            for method in methods:
                by_method.setdefault(method, []).append(entry)
        self._routes = tuple(routes)
        # method -> (every literal prefix, for one C-level startswith; the entries, in order)
        self._by_method: dict[str, tuple[tuple[str, ...], tuple[_Entry, ...]]] = {
            method: (tuple({entry[0]: None for entry in entries}), tuple(entries))
            for method, entries in by_method.items()
        }

    @property
    def routes(self) -> tuple[UsageRoute, ...]:
        """The routes, in the order they are tried."""
        return self._routes

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The first route matching ``method`` and ``path``, or ``None`` (pass the request on)."""
        indexed = self._by_method.get(method)
        if indexed is None:
            return None
        prefixes, entries = indexed
        if not path.startswith(prefixes):
            return None
        for prefix, regex, route in entries:
            # Starlette's own test (re.match with "$"), so a trailing newline matches as it does there.
            if path.startswith(prefix) and (found := regex.match(path)) is not None:
                return RouteMatch(route, found.groupdict())
        return None


def _compile(route: UsageRoute) -> _Entry:
    where = f"route {route.method} {route.path}"
    params = list(PARAM_REGEX.finditer(route.path))
    for param in params:
        convertor = (param.group(2) or ":str")[1:]
        if convertor not in CONVERTOR_TYPES:
            known = ", ".join(sorted(CONVERTOR_TYPES))
            msg = f"{where}: unknown path convertor {convertor!r}; use one of {known}"
            raise ConfigError(msg)
    try:
        regex, _, convertors = compile_path(route.path)
    except ValueError as exc:
        msg = f"{where}: {exc}"
        raise ConfigError(msg) from None
    kinds = set()
    for field in _EVENT_FIELDS:
        source: FieldSource | None = getattr(route, field)
        if source is None:
            continue
        kinds.add(source.kind)
        _check_source(where, field, source, convertors)
    if {"json", "form"} <= kinds:
        msg = f"{where}: reads both json: and form: fields, but a body is one or the other"
        raise ConfigError(msg)
    _check_constants(where, route)
    prefix = route.path[: params[0].start()] if params else route.path
    return prefix, regex, route


def _check_source(
    where: str, field: str, source: FieldSource, convertors: Mapping[str, Any]
) -> None:
    problem = None
    if source.kind == "path" and source.name not in convertors:
        problem = f"the template has no path parameter {source.name!r}"
    elif source.kind == "json" and "" in source.name.split("."):
        problem = f"{source.name!r} has an empty segment; write dotted names like usage.quantity"
    elif source.kind == "header" and not _TOKEN_RE.fullmatch(source.name):
        problem = f"{source.name!r} is not a valid header name"
    elif source.kind == "const" and field == "identifier":
        problem = "a constant identifier would make every event a duplicate of the first"
    elif source.kind == "const" and field == "timestamp" and source.name != "now":
        problem = "the only constant timestamp is 'now'"
    if problem:
        msg = f"{where}: {field} = {source.kind}:{source.name}: {problem}"
        raise ConfigError(msg)


def _check_constants(where: str, route: UsageRoute) -> None:
    """Refuse at start-up a constant that would make every request fail."""
    values: dict[str, object] = {}
    for field in ("customer", "event_name", "subscription_item", "quantity", "action"):
        source: FieldSource | None = getattr(route, field)
        if source is None or source.kind != "const":
            continue
        try:
            values[field] = _FIELD_PARSERS[field](source.name, field)
        except UsageInputError as exc:
            msg = f"{where}: constant {exc.message}"
            raise ConfigError(msg) from None
    probe = {"identifier": "p", "customer": "p", "event_name": "p", "quantity": 0, "timestamp": 1}
    try:
        UsageEvent.model_validate(probe | values)
    except ValidationError as exc:
        field, reason = _pydantic_message(exc)
        msg = f"{where}: constant {field} is invalid: {reason}"
        raise ConfigError(msg) from None


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
    for field in _EVENT_FIELDS[:-1]:
        source: FieldSource | None = getattr(route, field)
        params[field] = field if source is None or source.kind == "const" else source.name
        raw = None if source is None else request.read(source, field)
        if raw is not None:
            values[field] = _FIELD_PARSERS[field](raw, params[field])
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
        field, message = _pydantic_message(exc)
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
        raise UsageInputError(msg, param=param, code=_INVALID)
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


_FIELD_PARSERS: dict[str, Callable[[Any, str], object]] = {
    "customer": _text,
    "event_name": _text,
    "subscription_item": _text,
    "quantity": _quantity,
    "timestamp": _timestamp_value,
    "action": _action,
}


def _pydantic_message(exc: ValidationError) -> tuple[str, str]:
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
