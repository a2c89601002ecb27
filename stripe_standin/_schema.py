"""Checking a value against an OpenAPI schema of Stripe's: replies as JSON, requests as sent.

``problems`` lists every way a value breaks a schema. Replies are JSON, so types are JSON's.
Requests are checked as Stripe reads them: a v1 form body arrives as strings (``quantity=3``,
``recurring[interval]=month``, ``items[0][price]=…`` decoded into nested dicts, indexes as keys), so
in ``form`` mode an integer is a string of digits, a boolean ``true``/``false``, and an array a
list or an index-keyed hash; an object schema with ``additionalProperties: false`` refuses names it
does not list (Stripe's ``parameter_unknown``). A ``$ref`` the document does not hold is accepted:
the excerpt cannot say, and the uncovered part is counted elsewhere, not guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

__all__ = ["Resolver", "problems"]

Resolver = Callable[[Mapping[str, Any]], "Mapping[str, Any] | None"]
"""Turns a ``$ref`` schema into the schema it names (None: unknown here)."""

_INTEGER = re.compile(r"^-?\d+$")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _json_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    return True


def _form_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, str) and bool(_INTEGER.match(value))
    if kind == "number":
        return isinstance(value, str) and bool(_NUMBER.match(value))
    if kind == "boolean":
        return value in ("true", "false")
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list) or (
            isinstance(value, dict) and all(str(key).isdigit() for key in value)
        )
    return True


def _items(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value[key] for key in sorted(value, key=int)]
    return list(value)


def _is_date_time(value: str) -> bool:
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def problems(
    value: Any, schema: Mapping[str, Any], where: str, resolve: Resolver, *, form: bool = False
) -> Iterator[str]:
    """Every way ``value`` breaks ``schema`` (``form``: a decoded v1 form body or query)."""
    target = resolve(schema)
    if target is None:
        return
    schema = target
    if value is None:
        if not schema.get("nullable") and not form:
            yield f"{where} is null but the spec does not allow null"
        return
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        if all(any(True for _ in problems(value, o, where, resolve, form=form)) for o in options):
            yield f"{where} = {_show(value)} matches none of the spec's alternatives"
        return
    kind = schema.get("type")
    matches = _form_type if form else _json_type
    if isinstance(kind, str) and not matches(value, kind):
        yield f"{where} = {_show(value)} is not of type {kind}"
        return
    if "enum" in schema and value not in schema["enum"]:
        shown = [str(e) for e in schema["enum"]] if form else schema["enum"]
        if not (form and str(value) in shown):
            yield f"{where} = {_show(value)} is not one of {schema['enum']}"
    if isinstance(value, str):
        limit = schema.get("maxLength")
        if isinstance(limit, int) and len(value) > limit:
            yield f"{where} is {len(value)} characters long, more than {limit}"
        if schema.get("format") == "date-time" and not _is_date_time(value):
            yield f"{where} = {_show(value)} is not an RFC 3339 date-time"
    if kind == "array" or (kind is None and isinstance(value, list)):
        for index, item in enumerate(_items(value)):
            item_where = f"{where}[{index}]"
            yield from problems(item, schema.get("items", {}), item_where, resolve, form=form)
    elif isinstance(value, dict):
        yield from _object_problems(value, schema, where, resolve, form=form)


def _object_problems(
    value: dict[str, Any], schema: Mapping[str, Any], where: str, resolve: Resolver, *, form: bool
) -> Iterator[str]:
    properties: Mapping[str, Any] = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            yield f"{where} lacks required {name!r}"
    extra = schema.get("additionalProperties")
    for name, item in value.items():
        if name in properties:
            yield from problems(item, properties[name], f"{where}.{name}", resolve, form=form)
        elif isinstance(extra, Mapping):
            yield from problems(item, extra, f"{where}.{name}", resolve, form=form)
        elif extra is False:
            yield f"{where} has {name!r}, which the spec does not know"
