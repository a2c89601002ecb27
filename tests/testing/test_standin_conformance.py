"""The stand-in against Stripe's published OpenAPI excerpts in ``../shared/stripe/openapi``.

For every implemented endpoint found in an excerpt: each parameter the stand-in accepts exists in the
spec, each parameter the spec requires is required by the stand-in, and each object the stand-in
returns (made for real, through the app) has every property its schema requires, with a compatible
JSON type. The excerpts are read in place and never copied into this repository.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from dualwrite.testing import StripeStandin
from dualwrite.testing._endpoints import ENDPOINTS, Endpoint
from dualwrite.testing._objects import OBJECT_RENDERERS
from dualwrite.testing._params import Param

SHARED = Path(__file__).resolve().parents[3] / "shared" / "stripe"
OPENAPI = SHARED / "openapi"
if not OPENAPI.is_dir():
    pytest.skip(
        f"Stripe's OpenAPI excerpts are not here ({OPENAPI}); they live beside the project in the "
        "maintainers' workspace, not in the repository, so this check only runs there.",
        allow_module_level=True,
    )

Key = tuple[str, str]
EXCERPTS = {p.name: json.loads(p.read_text()) for p in sorted(OPENAPI.glob("*.json"))}
FIXTURES: dict[str, dict[str, Any]] = EXCERPTS.get("fixtures.json", {}).get("resources", {})


def _normalise(path: str) -> str:
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
                    operations[(method.upper(), _normalise(path))] = operation
        collect(excerpt)
    return operations, schemas


OPERATIONS, SCHEMAS = _index()
COVERED = sorted(key for key in ENDPOINTS if (key[0], _normalise(key[1])) in OPERATIONS)


def _operation(key: Key) -> dict[str, Any]:
    return OPERATIONS[(key[0], _normalise(key[1]))]


def _spec_params(operation: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The operation's parameters (query or form body) with their schemas, and the required ones."""
    params: dict[str, Any] = {}
    required: set[str] = set()
    for param in operation.get("parameters", []):
        if param.get("in") == "query":
            params[param["name"]] = param.get("schema", {})
            if param.get("required"):
                required.add(param["name"])
    content = (operation.get("requestBody") or {}).get("content", {})
    form = content.get("application/x-www-form-urlencoded", {}).get("schema", {})
    params.update(form.get("properties", {}))
    required.update(form.get("required", []))
    return params, required


# ---- validating values against schemas ---------------------------------------------------------

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _problems(value: Any, schema: dict[str, Any], where: str) -> Iterator[str]:
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
        if all(list(_problems(value, option, where)) for option in options):
            yield f"{where} = {value!r} matches none of the spec's alternatives"
        return
    kind = schema.get("type")
    if kind in _JSON_TYPES and not _JSON_TYPES[kind](value):
        yield f"{where} = {value!r} is not of JSON type {kind}"
        return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where} = {value!r} is not one of {schema['enum']}"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                yield f"{where} lacks required property {name!r}"
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                yield from _problems(item, properties[name], f"{where}.{name}")
            elif isinstance(extra, dict):
                yield from _problems(item, extra, f"{where}.{name}")
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from _problems(item, schema.get("items", {}), f"{where}[{index}]")


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    """Every Stripe object (a dict with an ``object`` field) inside a reply."""
    if isinstance(value, dict):
        if isinstance(value.get("object"), str):
            yield value
        for item in value.values():
            yield from _objects(item)
    elif isinstance(value, list):
        for item in value:
            yield from _objects(item)


# ---- producing real replies ---------------------------------------------------------------------

ACACIA = "2025-02-24.acacia"


def _steps(now: int) -> list[tuple[Key, Callable[[dict[str, str]], dict[str, str]], str | None]]:
    """Every endpoint, called once (some twice) in an order that makes each call succeed."""
    minute = now // 60 * 60

    def fixed(params: dict[str, str]) -> Callable[[dict[str, str]], dict[str, str]]:
        """Parameters that do not depend on the ids created so far."""
        return lambda ids: params

    return [
        (("POST", "/v1/customers"), fixed({"name": "A", "metadata[k]": "v"}), "customer"),
        (("GET", "/v1/customers"), fixed({}), None),
        (("GET", "/v1/customers/{id}"), fixed({}), None),
        (("POST", "/v1/products"), fixed({"name": "P"}), "product"),
        (("GET", "/v1/products"), fixed({}), None),
        (("GET", "/v1/products/{id}"), fixed({}), None),
        (
            ("POST", "/v1/billing/meters"),
            fixed(
                {
                    "display_name": "Calls",
                    "event_name": "calls",
                    "default_aggregation[formula]": "sum",
                    "customer_mapping[event_payload_key]": "stripe_customer_id",
                    "customer_mapping[type]": "by_id",
                    "value_settings[event_payload_key]": "value",
                }
            ),
            "meter",
        ),
        (("GET", "/v1/billing/meters"), fixed({}), None),
        (("GET", "/v1/billing/meters/{id}"), fixed({}), None),
        (
            ("POST", "/v1/prices"),
            lambda ids: {
                "currency": "usd",
                "product": ids["product"],
                "unit_amount_decimal": "0.5",
                "recurring[interval]": "month",
                "recurring[usage_type]": "metered",
                "recurring[meter]": ids["meter"],
            },
            "meter_price",
        ),
        (
            ("POST", "/v1/prices"),
            lambda ids: {
                "currency": "usd",
                "product": ids["product"],
                "unit_amount": "2",
                "recurring[interval]": "month",
                "recurring[usage_type]": "metered",
                "recurring[aggregate_usage]": "sum",
            },
            "price",
        ),
        (("GET", "/v1/prices"), fixed({}), None),
        (("GET", "/v1/prices/{id}"), fixed({}), None),
        (
            ("POST", "/v1/subscriptions"),
            lambda ids: {"customer": ids["customer"], "items[0][price]": ids["price"]},
            "subscription",
        ),
        (("GET", "/v1/subscriptions"), fixed({}), None),
        (("GET", "/v1/subscriptions/{id}"), fixed({}), None),
        (
            ("GET", "/v1/subscription_items"),
            lambda ids: {"subscription": ids["subscription"]},
            None,
        ),
        (("GET", "/v1/subscription_items/{id}"), fixed({}), None),
        (("POST", "/v1/subscription_items/{id}/usage_records"), fixed({"quantity": "3"}), None),
        (("GET", "/v1/subscription_items/{id}/usage_record_summaries"), fixed({}), None),
        (
            ("POST", "/v1/billing/meter_events"),
            lambda ids: {
                "event_name": "calls",
                "payload[stripe_customer_id]": ids["customer"],
                "payload[value]": "4",
                "identifier": "conf-1",
            },
            None,
        ),
        (
            ("GET", "/v1/billing/meters/{id}/event_summaries"),
            lambda ids: {
                "customer": ids["customer"],
                "start_time": str(minute - 3600),
                "end_time": str(minute + 120),
            },
            None,
        ),
        (
            ("POST", "/v1/billing/meter_event_adjustments"),
            fixed({"event_name": "calls", "type": "cancel", "cancel[identifier]": "conf-1"}),
            None,
        ),
        (("POST", "/v1/subscription_items/{id}"), lambda ids: {"price": ids["meter_price"]}, None),
        (("POST", "/v1/billing/meters/{id}/deactivate"), fixed({}), None),
        (("POST", "/v1/billing/meters/{id}/reactivate"), fixed({}), None),
    ]


_PATH_ID = {
    "/v1/customers/": "customer",
    "/v1/products/": "product",
    "/v1/prices/": "price",
    "/v1/subscriptions/": "subscription",
    "/v1/subscription_items/": "item",
    "/v1/billing/meters/": "meter",
}


async def _collect() -> dict[Key, list[Any]]:
    standin = StripeStandin(start_time=1_736_942_400)
    found: dict[Key, list[Any]] = {}
    ids: dict[str, str] = {}
    headers = {"Authorization": "Bearer sk_test_conformance0000", "Stripe-Version": ACACIA}
    transport = httpx.ASGITransport(app=standin.app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://standin", headers=headers
    ) as http:
        for key, params_for, save_as in _steps(standin.clock.now()):
            method, template = key
            prefix = template.split("{id}")[0]
            path = template.replace("{id}", ids.get(_PATH_ID.get(prefix, ""), ""))
            params = params_for(ids)
            reply = await http.request(
                method,
                path,
                params=params if method == "GET" else None,
                data=params if method == "POST" else None,
            )
            assert reply.status_code == 200, f"{method} {path}: {reply.text}"
            body = reply.json()
            found.setdefault(key, []).append(body)
            if save_as is not None:
                ids[save_as] = body["id"]
            if save_as == "subscription":
                ids["item"] = body["items"]["data"][0]["id"]
    return found


@pytest.fixture(scope="module")
def replies() -> dict[Key, list[Any]]:
    """Every endpoint's real 200 replies, made in-process through the app."""
    return anyio.run(_collect)


# ---- the checks ----------------------------------------------------------------------------------


class TestCoverage:
    """What the excerpts cover and that every endpoint is exercised."""

    def test_excerpts_cover_the_usage_and_meter_endpoints(self) -> None:
        """The excerpts describe the endpoints dualwrite depends on most."""
        covered = {path for _, path in COVERED}
        assert "/v1/subscription_items/{id}/usage_records" in covered
        assert "/v1/billing/meter_events" in covered
        assert "/v1/billing/meters/{id}/event_summaries" in covered

    def test_every_endpoint_is_exercised(self, replies: dict[Key, list[Any]]) -> None:
        """The reply run calls every implemented endpoint, so none escapes the object checks."""
        assert set(replies) == set(ENDPOINTS)

    def test_returned_object_types_are_declared(self, replies: dict[Key, list[Any]]) -> None:
        """Every ``object`` value returned is one ``OBJECT_RENDERERS`` declares (or a list)."""
        seen = {o["object"] for bodies in replies.values() for b in bodies for o in _objects(b)}
        assert seen - {"list"} == set(OBJECT_RENDERERS)


def _endpoint(key: Key) -> Endpoint:
    return ENDPOINTS[key]


def _ids(key: Key) -> str:
    return f"{key[0]} {key[1]}"


class TestParameters:
    """The stand-in's parameter table against each operation in the spec."""

    @pytest.mark.parametrize("key", COVERED, ids=_ids)
    def test_accepted_parameters_exist(self, key: Key) -> None:
        """Every parameter the stand-in accepts (nested ones included) is in the spec."""
        spec, _ = _spec_params(_operation(key))
        assert sorted(set(_endpoint(key).params) - set(spec)) == []
        for name, param in _endpoint(key).params.items():
            assert _nested_unknown(param, spec[name], name) == []

    @pytest.mark.parametrize("key", COVERED, ids=_ids)
    def test_spec_required_parameters_are_required(self, key: Key) -> None:
        """Every parameter the spec requires is required by the stand-in."""
        _, required = _spec_params(_operation(key))
        ours = {name for name, param in _endpoint(key).params.items() if param.required}
        assert sorted(required - ours) == []


def _nested_unknown(param: Param, schema: dict[str, Any], name: str) -> list[str]:
    """Nested fields the stand-in accepts that the spec's object schema does not list."""
    options = [schema, *schema.get("anyOf", [])]
    properties: dict[str, Any] = {}
    for option in options:
        properties.update(option.get("properties", {}))
    if param.kind != "object" or not properties:
        return []
    unknown = [f"{name}[{field}]" for field in param.fields if field not in properties]
    for field, sub in param.fields.items():
        if field in properties:
            unknown += _nested_unknown(sub, properties[field], f"{name}[{field}]")
    return unknown


class TestReplies:
    """Real replies against the spec's response schemas."""

    @pytest.mark.parametrize("key", COVERED, ids=_ids)
    def test_reply_matches_the_operation_schema(
        self, key: Key, replies: dict[Key, list[Any]]
    ) -> None:
        """Each reply has every required property, with compatible JSON types."""
        content = _operation(key)["responses"]["200"]["content"]
        schema = content["application/json"]["schema"]
        problems = [p for body in replies[key] for p in _problems(body, schema, _ids(key))]
        assert problems == []

    def test_every_object_matches_its_schema(self, replies: dict[Key, list[Any]]) -> None:
        """Objects the excerpts describe (customer, price, meter, …) match wherever returned."""
        checked: set[str] = set()
        problems: list[str] = []
        for key, bodies in replies.items():
            for obj in (o for b in bodies for o in _objects(b)):
                schema = SCHEMAS.get(f"#/components/schemas/{obj['object']}")
                if schema is not None:
                    checked.add(obj["object"])
                    problems += _problems(obj, schema, f"{_ids(key)} → {obj['object']}")
        assert problems == []
        assert {"customer", "price", "subscription", "usage_record", "billing.meter"} <= checked

    def test_fixture_fields_are_present(self, replies: dict[Key, list[Any]]) -> None:
        """Every field of Stripe's own fixture objects appears in ours, with the same JSON type."""
        ours: dict[str, dict[str, Any]] = {}
        for bodies in replies.values():
            for obj in (o for b in bodies for o in _objects(b)):
                ours.setdefault(obj["object"], obj)
        problems = []
        for name, fixture in FIXTURES.items():
            mine = ours[name]
            for field, value in fixture.items():
                if field not in mine:
                    problems.append(f"{name}.{field} missing")
                elif None not in (value, mine[field]) and not _same_json_type(value, mine[field]):
                    problems.append(f"{name}.{field}: {mine[field]!r} vs fixture {value!r}")
        assert problems == []


def _same_json_type(a: Any, b: Any) -> bool:
    number = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, number) and isinstance(b, number):
        return True
    return type(a) is type(b)
