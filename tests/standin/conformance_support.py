"""Reading Stripe's OpenAPI excerpts and checking values against them, for the conformance test.

The excerpts live beside the project in the maintainers' workspace (``../shared/stripe/openapi``)
and are read in place; when they are absent everything here is empty and the test module skips.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from stripe_standin._params import Param

SHARED = Path(__file__).resolve().parents[3] / "shared" / "stripe"
OPENAPI = SHARED / "openapi"
EXCERPTS = {p.name: json.loads(p.read_text()) for p in sorted(OPENAPI.glob("*.json"))}
FIXTURES: dict[str, dict[str, Any]] = EXCERPTS.get("fixtures.json", {}).get("resources", {})

Key = tuple[str, str]


def normalise(path: str) -> str:
    """A path template with its variables blanked, so ``{id}`` matches ``{customer}``."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def _index() -> tuple[dict[Key, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Operations by (METHOD, normalised path), and resolved schemas by their ``$ref``."""
    operations: dict[Key, dict[str, Any]] = {}
    schemas: dict[str, dict[str, Any]] = {}

    def collect(node: Any) -> None:
        """Record every resolved schema inside ``node``."""
        if isinstance(node, dict):
            if "x-resolved-from" in node and "properties" in node:
                schemas.setdefault(node["x-resolved-from"], node)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for excerpt in EXCERPTS.values():
        for path, item in excerpt.get("paths", {}).items():
            for method, operation in item.items():
                if isinstance(operation, dict) and "responses" in operation:
                    operations[(method.upper(), normalise(path))] = operation
        collect(excerpt)
    return operations, schemas


OPERATIONS, SCHEMAS = _index()


def operation(key: Key) -> dict[str, Any]:
    """The spec's operation for an endpoint of the stand-in's table."""
    return OPERATIONS[(key[0], normalise(key[1]))]


def spec_params(op: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The operation's parameters (query, form or JSON body) with their schemas, and the
    required ones."""
    params: dict[str, Any] = {}
    required: set[str] = set()
    for param in op.get("parameters", []):
        if param.get("in") == "query":
            params[param["name"]] = param.get("schema", {})
            if param.get("required"):
                required.add(param["name"])
    content = (op.get("requestBody") or {}).get("content", {})
    for media in ("application/x-www-form-urlencoded", "application/json"):
        body = content.get(media, {}).get("schema", {})
        params.update(body.get("properties", {}))
        required.update(body.get("required", []))
    return params, required


def _properties(schema: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """An object schema's properties and required names (``anyOf`` alternatives merged)."""
    properties: dict[str, Any] = {}
    required: set[str] = set()
    for option in [schema, *schema.get("anyOf", [])]:
        properties.update(option.get("properties", {}))
        required.update(option.get("required", []))
    return properties, required


def nested_mismatches(param: Param, schema: dict[str, Any], name: str) -> list[str]:
    """Nested fields the stand-in accepts that the spec does not list, and nested fields the spec
    requires that the stand-in does not, inside objects and arrays of objects."""
    if param.kind == "list" and param.item is not None:
        return nested_mismatches(param.item, schema.get("items", {}), f"{name}[]")
    properties, required = _properties(schema)
    if param.kind != "object" or not properties:
        return []
    found = [f"{name}[{field}] unknown" for field in param.fields if field not in properties]
    found += [
        f"{name}[{field}] not required"
        for field in sorted(required)
        if field not in param.fields or not param.fields[field].required
    ]
    for field, sub in param.fields.items():
        if field in properties:
            found += nested_mismatches(sub, properties[field], f"{name}[{field}]")
    return found


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _is_date_time(value: str) -> bool:
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def problems(value: Any, schema: dict[str, Any], where: str) -> Iterator[str]:
    """Every way ``value`` breaks ``schema`` (unresolved ``$ref``s are accepted as unknown)."""
    if "$ref" in schema:
        if schema["$ref"] not in SCHEMAS:
            return
        schema = SCHEMAS[schema["$ref"]]
    if value is None:
        if not schema.get("nullable"):
            yield f"{where} is null but the spec does not allow null"
        return
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        if all(list(problems(value, option, where)) for option in options):
            yield f"{where} = {value!r} matches none of the spec's alternatives"
        return
    kind = schema.get("type")
    if kind in _JSON_TYPES and not _JSON_TYPES[kind](value):
        yield f"{where} = {value!r} is not of JSON type {kind}"
        return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where} = {value!r} is not one of {schema['enum']}"
    if schema.get("format") == "date-time" and isinstance(value, str) and not _is_date_time(value):
        yield f"{where} = {value!r} is not an RFC 3339 date-time"
    if isinstance(value, dict):
        yield from _object_problems(value, schema, where)
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from problems(item, schema.get("items", {}), f"{where}[{index}]")


def _object_problems(value: dict[str, Any], schema: dict[str, Any], where: str) -> Iterator[str]:
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            yield f"{where} lacks required property {name!r}"
    extra = schema.get("additionalProperties")
    for name, item in value.items():
        if name in properties:
            yield from problems(item, properties[name], f"{where}.{name}")
        elif isinstance(extra, dict):
            yield from problems(item, extra, f"{where}.{name}")
        elif extra is False:
            yield f"{where} has {name!r}, which the spec does not allow"


def objects(value: Any) -> Iterator[dict[str, Any]]:
    """Every Stripe object (a dict with an ``object`` field) inside a reply."""
    if isinstance(value, dict):
        if isinstance(value.get("object"), str):
            yield value
        for item in value.values():
            yield from objects(item)
    elif isinstance(value, list):
        for item in value:
            yield from objects(item)


def same_json_type(a: Any, b: Any) -> bool:
    """Whether two values have the same JSON type (ints and floats are both numbers)."""
    number = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, number) and isinstance(b, number):
        return True
    return type(a) is type(b)
