"""Stripe's form encoding (``items[0][price]=x``, ``expand[]=y``) and parameter validation.

``decode_form`` turns the wire pairs into nested dicts and lists; ``validate`` checks them against a
declarative spec (a mapping of parameter name to ``Param``) and refuses, with Stripe's error codes,
unknown parameters (``parameter_unknown``), missing ones (``parameter_missing``), empty strings
(``parameter_invalid_empty``), bad integers (``parameter_invalid_integer``) and bad enum values.
API v2's JSON bodies are validated by the same specs (the app gives their refusals v2's shape).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from stripe_standin._clock import parse_iso
from stripe_standin._errors import StripeApiError, invalid, missing_param, unknown_param

__all__ = [
    "Param",
    "ParamKind",
    "boolean",
    "date_time",
    "decimal",
    "decode_form",
    "expand",
    "flatten",
    "integer",
    "json_type",
    "lst",
    "metadata",
    "obj",
    "string",
    "string_map",
    "timestamp",
    "validate",
]

ParamKind = Literal[
    "string",
    "integer",
    "decimal",
    "boolean",
    "timestamp",
    "datetime",
    "metadata",
    "map",
    "object",
    "list",
    "expand",
]
"""How a parameter's wire value is read."""

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_TOKEN = re.compile(r"\[([^\[\]]*)\]")
_INTEGER = re.compile(r"^-?\d+$")


@dataclass(frozen=True, slots=True)
class Param:
    """One accepted parameter: its kind, whether it is required, and its constraints."""

    kind: ParamKind
    required: bool = False
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None
    fields: Mapping[str, Param] = field(default_factory=dict)
    item: Param | None = None
    allow_now: bool = False
    min_items: int | None = None
    max_items: int | None = None


def string(
    *, required: bool = False, choices: tuple[str, ...] = (), max_length: int | None = 5000
) -> Param:
    """A string parameter, optionally limited to ``choices``."""
    return Param("string", required=required, choices=choices, max_length=max_length)


def integer(
    *, required: bool = False, minimum: int | None = None, maximum: int | None = None
) -> Param:
    """An integer parameter with optional bounds."""
    return Param("integer", required=required, minimum=minimum, maximum=maximum)


def timestamp(*, required: bool = False, allow_now: bool = False) -> Param:
    """A Unix timestamp (or the literal ``now`` where Stripe allows it)."""
    return Param("timestamp", required=required, minimum=0, allow_now=allow_now)


def date_time(*, required: bool = False) -> Param:
    """An API v2 RFC 3339 date-time string (``2024-06-01T12:00:00.000Z``), read as Unix seconds."""
    return Param("datetime", required=required)


def decimal(*, required: bool = False) -> Param:
    """A decimal string such as ``unit_amount_decimal=0.25``."""
    return Param("decimal", required=required)


def boolean(*, required: bool = False) -> Param:
    """``true`` or ``false``."""
    return Param("boolean", required=required)


def metadata() -> Param:
    """Stripe metadata: string keys (≤ 40 chars) to string values (≤ 500 chars)."""
    return Param("metadata")


def string_map(*, required: bool = False) -> Param:
    """A free map of strings, such as a meter event's ``payload``."""
    return Param("map", required=required)


def obj(fields: Mapping[str, Param], *, required: bool = False) -> Param:
    """A nested hash with its own fields (``recurring[interval]``)."""
    return Param("object", required=required, fields=fields)


def lst(
    item: Param,
    *,
    required: bool = False,
    min_items: int | None = None,
    max_items: int | None = None,
) -> Param:
    """An array (``items[0][price]``, ``lookup_keys[]``, or a JSON array in API v2)."""
    return Param("list", required=required, item=item, min_items=min_items, max_items=max_items)


def expand() -> Param:
    """``expand[]``: accepted everywhere Stripe accepts it (the stand-in does not expand)."""
    return Param("expand")


def decode_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest form pairs by Stripe's bracket syntax; ``[]`` appends and ``[0]`` indexes."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY.match(key)
        tokens = [match.group(1), *_TOKEN.findall(match.group(2))] if match else [key]
        _insert(root, tokens, value, key)
    return root


def _insert(root: dict[str, Any], tokens: list[str], value: str, key: str) -> None:
    node: dict[str, Any] | list[Any] = root
    for index, token in enumerate(tokens):
        last = index == len(tokens) - 1
        if isinstance(node, list):
            if token != "":
                raise invalid(f"Invalid array: {key}", param=tokens[0])
            if last:
                node.append(value)
                return
            child: Any = {}
            node.append(child)
            node = child
            continue
        if last:
            if isinstance(node.get(token), dict | list):
                raise invalid(f"Invalid hash: {key}", param=tokens[0])
            node[token] = value
            return
        wants_list = tokens[index + 1] == ""
        child = node.get(token)
        if child is None or child == "":
            child = [] if wants_list else {}
            node[token] = child
        elif isinstance(child, str) or wants_list != isinstance(child, list):
            raise invalid(f"Invalid hash: {key}", param=tokens[0])
        node = child


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Back to Stripe's bracket names: ``{"payload": {"a": "1"}}`` → ``{"payload[a]": "1"}``."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        full = _join(prefix, str(name))
        if isinstance(value, Mapping):
            flat.update(flatten(value, full))
        elif isinstance(value, list):
            flat.update(flatten({str(i): v for i, v in enumerate(value)}, full))
        else:
            flat[full] = str(value)
    return flat


def validate(spec: Mapping[str, Param], raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check ``raw`` against ``spec`` and return the typed values; raise Stripe's 400s."""
    for name in raw:
        if name not in spec:
            raise unknown_param(_join(prefix, name))
    values: dict[str, Any] = {}
    for name, param in spec.items():
        full = _join(prefix, name)
        if name not in raw:
            if param.required:
                raise missing_param(full)
            continue
        values[name] = _coerce(param, raw[name], full)
    return values


def _join(prefix: str, name: str) -> str:
    return f"{prefix}[{name}]" if prefix else name


def _empty(name: str) -> StripeApiError:
    return invalid(
        f"You passed an empty string for '{name}'. We assume empty values are an attempt to "
        f"unset a parameter; however '{name}' cannot be unset. You should remove '{name}' from "
        "your request or supply a non-empty value.",
        param=name,
        code="parameter_invalid_empty",
    )


def _scalar(value: Any, name: str, what: str) -> str:
    if not isinstance(value, str):
        shape = "a hash or array" if isinstance(value, dict | list) else f"{json_type(value)}"
        raise invalid(f"Invalid {what}: {name} must be a {what}, not {shape}", param=name)
    if value == "":
        raise _empty(name)
    return value


def json_type(value: Any) -> str:
    """How JSON names the type of a decoded value (for refusals of API v2 bodies)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number" if isinstance(value, int | float) else "a string"


def _coerce(param: Param, value: Any, name: str) -> Any:
    kind = param.kind
    if kind == "string":
        return _coerce_string(param, value, name)
    if kind == "datetime":
        text = _scalar(value, name, "date-time")
        moment = parse_iso(text)
        if moment is None:
            # UNVERIFIED wording; the format is the spec's (``format: date-time``).
            msg = f"Invalid {name}: must be an RFC 3339 date-time such as 2024-06-01T12:00:00.000Z"
            raise invalid(msg, param=name)
        return moment
    if kind in ("integer", "timestamp"):
        return _coerce_integer(param, value, name)
    if kind == "decimal":
        text = _scalar(value, name, "decimal")
        try:
            number = Decimal(text)
        except InvalidOperation:
            number = Decimal("NaN")
        if not number.is_finite():
            raise invalid(f"Invalid decimal: {text}", param=name)
        return number
    if kind == "boolean":
        text = _scalar(value, name, "boolean")
        if text not in ("true", "false"):
            raise invalid(f"Invalid boolean: {text}", param=name)
        return text == "true"
    if kind in ("metadata", "map"):
        return _coerce_map(param, value, name)
    if kind == "object":
        if value == "":
            raise _empty(name)
        if not isinstance(value, dict):
            raise invalid(f"Invalid hash: {name} must be an object", param=name)
        return validate(param.fields, value, name)
    items = _as_list(value, name)
    _check_size(param, items, name)
    if kind == "expand":
        return [_scalar(entry, f"{name}[{i}]", "string") for i, entry in enumerate(items)]
    item = param.item if param.item is not None else string()
    return [_coerce(item, entry, f"{name}[{i}]") for i, entry in enumerate(items)]


def _coerce_string(param: Param, value: Any, name: str) -> str:
    text = _scalar(value, name, "string")
    if param.choices and text not in param.choices:
        options = ", ".join(param.choices[:-1]) + f", or {param.choices[-1]}"
        if len(param.choices) == 1:
            options = param.choices[0]
        elif len(param.choices) == 2:
            options = f"{param.choices[0]} or {param.choices[1]}"
        raise invalid(f"Invalid {name}: must be one of {options}", param=name)
    if param.max_length is not None and len(text) > param.max_length:
        raise invalid(f"Invalid {name}: must be at most {param.max_length} characters", param=name)
    return text


def _coerce_integer(param: Param, value: Any, name: str) -> int | str:
    text = _scalar(value, name, "integer")
    if param.allow_now and text == "now":
        return text
    if not _INTEGER.match(text):
        raise invalid(f"Invalid integer: {text}", param=name, code="parameter_invalid_integer")
    number = int(text)
    if param.minimum is not None and number < param.minimum:
        raise invalid(
            f"This value must be greater than or equal to {param.minimum}.",
            param=name,
            code="parameter_invalid_integer",
        )
    if param.maximum is not None and number > param.maximum:
        raise invalid(
            f"This value must be less than or equal to {param.maximum}.",
            param=name,
            code="parameter_invalid_integer",
        )
    return number


def _coerce_map(param: Param, value: Any, name: str) -> dict[str, str]:
    if value == "":
        if param.kind == "metadata":
            return {}
        raise _empty(name)
    if not isinstance(value, dict):
        raise invalid(f"Invalid hash: {name} must be an object", param=name)
    result: dict[str, str] = {}
    for key, entry in value.items():
        full = f"{name}[{key}]"
        if not isinstance(entry, str):
            raise invalid(f"Invalid {full}: values must be strings", param=full)
        if param.kind == "metadata" and (len(key) > 40 or len(entry) > 500):
            raise invalid(
                "Metadata keys can be at most 40 characters and values at most 500 characters.",
                param=full,
            )
        result[key] = entry
    return result


def _check_size(param: Param, items: list[Any], name: str) -> None:
    """Refuse an array shorter than ``min_items`` or longer than ``max_items`` (wording UNVERIFIED)."""
    if param.min_items is not None and len(items) < param.min_items:
        msg = f"Invalid {name}: must contain at least {param.min_items} item(s), got {len(items)}"
        raise invalid(msg, param=name)
    if param.max_items is not None and len(items) > param.max_items:
        msg = f"Invalid {name}: must contain at most {param.max_items} items, got {len(items)}"
        raise invalid(msg, param=name)


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and all(str(key).isdigit() for key in value):
        return [value[key] for key in sorted(value, key=int)]
    if value == "":
        return []
    raise invalid(f"Invalid array: {name} must be an array", param=name)
