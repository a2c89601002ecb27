"""Helpers of the conformance test: Stripe's vendored OpenAPI excerpts against the stand-in's own
parameter table, and Stripe's own example objects (``spec/fixtures.json``) against its replies.

Replies are checked by ``stripe_standin.checking`` (every call of every test is); what is left
here is what the checking layer cannot see from single calls: which parameters the stand-in's
table accepts and requires, compared with the spec's.
"""

from __future__ import annotations

import json
from typing import Any

from stripe_standin._openapi import SPEC_DIR, Operation, find_operation
from stripe_standin._params import Param

FIXTURES: dict[str, dict[str, Any]] = json.loads((SPEC_DIR / "fixtures.json").read_text())[
    "resources"
]

Key = tuple[str, str]


def operation(key: Key, version: str) -> Operation | None:
    """The spec's operation for an endpoint of the stand-in's table (None: not in the excerpts)."""
    return find_operation(key[0], key[1].replace("{id}", "x_1"), version)


def spec_params(op: Operation, *, json_body: bool) -> tuple[dict[str, Any], set[str]]:
    """The operation's parameters (query, form or JSON body) with their schemas, and the
    required ones (``Operation.request_schema``)."""
    schema = op.request_schema(json_body=json_body)
    return schema["properties"], set(schema["required"])


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


def same_json_type(a: Any, b: Any) -> bool:
    """Whether two values have the same JSON type (ints and floats are both numbers)."""
    number = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, number) and isinstance(b, number):
        return True
    return type(a) is type(b)
