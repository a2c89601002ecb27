#!/usr/bin/env python3
"""Vendor excerpts of Stripe's published OpenAPI documents into ``stripe_standin/spec/``.

The stand-in's conformance checks (and the per-request, per-reply checking layer of the test suite)
read these copies, so they run in every clone. Two kinds of input:

* an excerpt already cut from a Stripe document (a JSON file with ``source`` naming the document,
  version and commit it came from, and usually ``api_version``): copied as it is;
* a published document itself (``stripe/openapi``'s ``openapi.spec3.json``, or any part of one
  holding the wanted paths and their schemas): ``--from-spec FILE --paths P ... --name NAME
  --source TEXT`` cuts the excerpt, resolving each response's top-level ``$ref`` in place (marked
  ``x-resolved-from``, as the excerpts above are) and keeping every other schema it references
  under ``components``; a reference it cannot find is marked ``x-unresolved``.

Each run rewrites ``MANIFEST.json``: per document its ``source``, API version(s), the SHA-256 of
its input and of the vendored copy, and the paths and schemas it holds. Run it again to refresh::

    python scripts/vendor_stripe_spec.py --excerpts ../shared/stripe/openapi \
        --keep test_clocks_2026-09-30.endive.json
"""

from __future__ import annotations

import argparse
import ast
import copy
import decimal
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import typing_extensions

OUT = Path(__file__).resolve().parents[1] / "stripe_standin" / "spec"
MANIFEST = "MANIFEST.json"
_REF = "#/components/schemas/"


class VendorError(Exception):
    """An input cannot be vendored (names the file and what is missing)."""


def dump(document: dict[str, Any]) -> str:
    """The vendored text of a document: stable, readable, ending in a newline."""
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def sha256(text: str | bytes) -> str:
    """The hex SHA-256 of a text (UTF-8) or bytes."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def versions_of(document: dict[str, Any], name: str) -> list[str]:
    """The API version(s) a document describes: its ``api_version``, else its ``source`` keys
    (the fixtures files name one source per version)."""
    if "source" not in document:
        msg = f"{name}: no `source` key; say which Stripe document, version and commit it is from"
        raise VendorError(msg)
    if isinstance(document.get("api_version"), str):
        return [document["api_version"]]
    if isinstance(document["source"], dict):
        return sorted(document["source"])
    msg = f"{name}: neither `api_version` nor a `source` per version: add `api_version`"
    raise VendorError(msg)


def _refs(node: Any) -> Iterator[str]:
    """Every schema name ``node`` references."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_REF):
            yield ref[len(_REF) :]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve_top(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """A response schema with its own ``$ref`` replaced by the schema it names."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith(_REF):
        return schema
    name = ref[len(_REF) :]
    if name not in schemas:
        return {**schema, "x-unresolved": "not present in source spec"}
    return {**copy.deepcopy(schemas[name]), "x-resolved-from": ref}


def extract(
    spec: dict[str, Any], paths: Sequence[str], *, source: str, name: str
) -> dict[str, Any]:
    """The excerpt of ``spec`` holding ``paths``, in the vendored format."""
    schemas: dict[str, Any] = spec.get("components", {}).get("schemas", {})
    missing = [path for path in paths if path not in spec.get("paths", {})]
    if missing:
        msg = f"{name}: the document has no {', '.join(missing)}"
        raise VendorError(msg)
    cut: dict[str, Any] = {}
    for path in paths:
        item = copy.deepcopy(spec["paths"][path])
        for operation in item.values():
            for response in operation.get("responses", {}).values():
                for media in response.get("content", {}).values():
                    media["schema"] = _resolve_top(media["schema"], schemas)
        cut[path] = item
    kept: dict[str, Any] = {}
    pending = sorted(set(_refs(cut)))
    while pending:
        ref = pending.pop()
        if ref in kept or ref not in schemas:
            continue
        kept[ref] = copy.deepcopy(schemas[ref])
        pending.extend(set(_refs(kept[ref])) - set(kept))
    version = spec.get("info", {}).get("version")
    if not isinstance(version, str):
        msg = f"{name}: the document has no info.version (its API version)"
        raise VendorError(msg)
    return {
        "source": source,
        "openapi": spec.get("openapi", "3.0.0"),
        "api_version": version,
        "paths": cut,
        "components": {"schemas": dict(sorted(kept.items()))},
        "unresolved_schemas": sorted(set(_refs(cut)) - set(kept)),
    }


# ---- Schemas derived from stripe-python's typed params and resource classes -----------------

_P = "stripe.params."
SDK_ENDPOINTS: dict[tuple[str, str], tuple[str | None, str | None, str, bool]] = {
    # (METHOD, Stripe's path template): (params class in stripe-python 12+, in 11.x, the object
    # the reply is or lists, whether it is a list). None: that SDK's API version has no such
    # endpoint (usage records left with basil) or it is judged by another document (meters and
    # v2 by the current version whatever the caller pins, as issue 15 asks).
    ("POST", "/v1/customers"): (
        _P + "_customer_create_params:CustomerCreateParams",
        "stripe._customer:Customer.CreateParams",
        "customer",
        False,
    ),
    ("GET", "/v1/customers"): (
        _P + "_customer_list_params:CustomerListParams",
        "stripe._customer:Customer.ListParams",
        "customer",
        True,
    ),
    ("GET", "/v1/customers/{customer}"): (
        _P + "_customer_retrieve_params:CustomerRetrieveParams",
        "stripe._customer:Customer.RetrieveParams",
        "customer",
        False,
    ),
    ("POST", "/v1/products"): (
        _P + "_product_create_params:ProductCreateParams",
        "stripe._product:Product.CreateParams",
        "product",
        False,
    ),
    ("GET", "/v1/products"): (
        _P + "_product_list_params:ProductListParams",
        "stripe._product:Product.ListParams",
        "product",
        True,
    ),
    ("GET", "/v1/products/{id}"): (
        _P + "_product_retrieve_params:ProductRetrieveParams",
        "stripe._product:Product.RetrieveParams",
        "product",
        False,
    ),
    ("POST", "/v1/prices"): (
        _P + "_price_create_params:PriceCreateParams",
        "stripe._price:Price.CreateParams",
        "price",
        False,
    ),
    ("GET", "/v1/prices"): (
        _P + "_price_list_params:PriceListParams",
        "stripe._price:Price.ListParams",
        "price",
        True,
    ),
    ("GET", "/v1/prices/{price}"): (
        _P + "_price_retrieve_params:PriceRetrieveParams",
        "stripe._price:Price.RetrieveParams",
        "price",
        False,
    ),
    ("POST", "/v1/subscriptions"): (
        _P + "_subscription_create_params:SubscriptionCreateParams",
        "stripe._subscription:Subscription.CreateParams",
        "subscription",
        False,
    ),
    ("GET", "/v1/subscriptions"): (
        _P + "_subscription_list_params:SubscriptionListParams",
        "stripe._subscription:Subscription.ListParams",
        "subscription",
        True,
    ),
    ("GET", "/v1/subscriptions/{subscription_exposed_id}"): (
        _P + "_subscription_retrieve_params:SubscriptionRetrieveParams",
        "stripe._subscription:Subscription.RetrieveParams",
        "subscription",
        False,
    ),
    ("GET", "/v1/subscription_items"): (
        _P + "_subscription_item_list_params:SubscriptionItemListParams",
        "stripe._subscription_item:SubscriptionItem.ListParams",
        "subscription_item",
        True,
    ),
    ("GET", "/v1/subscription_items/{item}"): (
        _P + "_subscription_item_retrieve_params:SubscriptionItemRetrieveParams",
        "stripe._subscription_item:SubscriptionItem.RetrieveParams",
        "subscription_item",
        False,
    ),
    ("POST", "/v1/subscription_items/{item}"): (
        _P + "_subscription_item_modify_params:SubscriptionItemModifyParams",
        "stripe._subscription_item:SubscriptionItem.ModifyParams",
        "subscription_item",
        False,
    ),
    ("POST", "/v1/subscription_items/{subscription_item}/usage_records"): (
        None,
        "stripe._subscription_item:SubscriptionItem.CreateUsageRecordParams",
        "usage_record",
        False,
    ),
    ("GET", "/v1/subscription_items/{subscription_item}/usage_record_summaries"): (
        None,
        "stripe._subscription_item:SubscriptionItem.ListUsageRecordSummariesParams",
        "usage_record_summary",
        True,
    ),
    ("POST", "/v1/subscription_schedules"): (
        _P + "_subscription_schedule_create_params:SubscriptionScheduleCreateParams",
        "stripe._subscription_schedule:SubscriptionSchedule.CreateParams",
        "subscription_schedule",
        False,
    ),
    ("GET", "/v1/subscription_schedules/{schedule}"): (
        _P + "_subscription_schedule_retrieve_params:SubscriptionScheduleRetrieveParams",
        "stripe._subscription_schedule:SubscriptionSchedule.RetrieveParams",
        "subscription_schedule",
        False,
    ),
    ("POST", "/v1/subscription_schedules/{schedule}"): (
        _P + "_subscription_schedule_modify_params:SubscriptionScheduleModifyParams",
        "stripe._subscription_schedule:SubscriptionSchedule.ModifyParams",
        "subscription_schedule",
        False,
    ),
    ("POST", "/v1/subscription_schedules/{schedule}/release"): (
        _P + "_subscription_schedule_release_params:SubscriptionScheduleReleaseParams",
        "stripe._subscription_schedule:SubscriptionSchedule.ReleaseParams",
        "subscription_schedule",
        False,
    ),
    ("GET", "/v1/invoices"): (
        _P + "_invoice_list_params:InvoiceListParams",
        "stripe._invoice:Invoice.ListParams",
        "invoice",
        True,
    ),
    ("GET", "/v1/invoices/{invoice}"): (
        _P + "_invoice_retrieve_params:InvoiceRetrieveParams",
        "stripe._invoice:Invoice.RetrieveParams",
        "invoice",
        False,
    ),
    ("POST", "/v1/invoices/create_preview"): (
        _P + "_invoice_create_preview_params:InvoiceCreatePreviewParams",
        "stripe._invoice:Invoice.CreatePreviewParams",
        "invoice",
        False,
    ),
    ("POST", "/v1/billing/meter_event_adjustments"): (
        _P + "billing._meter_event_adjustment_create_params:MeterEventAdjustmentCreateParams",
        None,
        "billing.meter_event_adjustment",
        False,
    ),
    ("POST", "/v1/billing/meters/{id}/deactivate"): (
        _P + "billing._meter_deactivate_params:MeterDeactivateParams",
        None,
        "billing.meter",
        False,
    ),
    ("POST", "/v1/billing/meters/{id}/reactivate"): (
        _P + "billing._meter_reactivate_params:MeterReactivateParams",
        None,
        "billing.meter",
        False,
    ),
    ("GET", "/v2/core/events/{id}"): (
        _P + "v2.core._event_retrieve_params:EventRetrieveParams",
        None,
        "v2.core.event",
        False,
    ),
}
"""The endpoints whose request schemas are derived from stripe-python, and where from."""

SDK_OBJECTS = (
    "customer",
    "invoice",
    "line_item",
    "price",
    "product",
    "subscription",
    "subscription_item",
    "subscription_schedule",
    "usage_record",
    "usage_record_summary",
    "billing.meter_event_adjustment",
)
"""The objects whose reply schemas are derived from stripe-python's resource classes (those the
stand-in answers with on the endpoints above; the meter is judged by the published excerpt)."""

_REQUEST_OPTIONS = {
    "api_key",
    "content_type",
    "headers",
    "idempotency_key",
    "max_network_retries",
    "stripe_account",
    "stripe_context",
    "stripe_version",
}
"""Keys of stripe-python's ``RequestOptions`` (a base of its params): the SDK's, never sent."""

_WRAPPERS = {typing_extensions.NotRequired, typing_extensions.Required, typing.Annotated}
_UNIONS = (typing.Union, types.UnionType)


def _key(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True)


def _literal_schema(values: Sequence[Any]) -> dict[str, Any]:
    kinds = {type(value) for value in values}
    kind = {str: "string", bool: "boolean", int: "integer"}.get(kinds.pop(), "string")
    return {"type": kind if not kinds else "string", "enum": list(values)}


class SdkTranslator:
    """Turns stripe-python's type hints into the OpenAPI schemas the checker reads.

    Requests (``TypedDict`` params): ``NotRequired`` → optional, else required; ``Literal`` →
    enum (stripe-python writes most enums ``Literal[...]|str``, a widening of its own so newer
    values do not break old clients: the spec's enum is the ``Literal``, so the ``str`` is
    dropped); ``Literal['']`` → Stripe's "emptyable" alternative; a nested ``TypedDict`` → an
    object listing its properties with ``additionalProperties: false``; ``List`` → array; ``Dict``
    → an object of values; other ``Union`` → ``anyOf``; ``Decimal`` → a decimal string.

    Replies (resource classes): each annotated attribute is a property; one the SDK types
    ``Optional`` may be null and need not be there (the SDK types both nullable and includable
    attributes so), any other is required; an expandable field is its id or the object; a
    resource nested in another is a ``$ref`` to its object (unresolved, so accepted, unless it is
    one of ``SDK_OBJECTS``).
    """

    def __init__(self, stripe: types.ModuleType) -> None:
        self.stripe = stripe
        self.namespace: dict[str, Any] = {**vars(typing), **vars(typing_extensions)}
        try:
            context = importlib.import_module("stripe._stripe_context")
            self.namespace["StripeContext"] = context.StripeContext
        except ImportError:
            pass
        self.modules: set[str] = set()
        self.refs: set[str] = set()
        self._stack: list[type] = []

    def hints(self, cls: type) -> dict[str, Any]:
        """The evaluated annotations of a class (its module's names, typing's, the SDK's)."""
        self.modules.add(cls.__module__)
        names = {**self.namespace, **self._checking_imports(cls.__module__)}
        return typing.get_type_hints(cls, localns=names, include_extras=True)

    @functools.cache  # noqa: B019 (one translator per run)
    def _checking_imports(self, module_name: str) -> dict[str, Any]:
        """The names a module imports under ``if TYPE_CHECKING:`` (its hints use them)."""
        tree = ast.parse(inspect.getsource(sys.modules[module_name]))
        names: dict[str, Any] = {}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"):
                continue
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module:
                    imported = importlib.import_module(statement.module)
                    for alias in statement.names:
                        value = getattr(imported, alias.name, None)
                        if value is None:
                            value = importlib.import_module(f"{statement.module}.{alias.name}")
                        names[alias.asname or alias.name] = value
        return names

    # requests
    def params(self, cls: type) -> dict[str, Any]:
        """The object schema of a params ``TypedDict`` (``RequestOptions`` keys left out)."""
        if cls in self._stack:
            msg = f"{cls.__qualname__} contains itself: cannot inline it"
            raise VendorError(msg)
        self._stack.append(cls)
        properties: dict[str, Any] = {}
        required: list[str] = []
        optional: frozenset[str] = getattr(cls, "__optional_keys__", frozenset())
        for name, hint in sorted(self.hints(cls).items()):
            if name in _REQUEST_OPTIONS:
                continue
            bare, wrapped_optional = self._unwrap(hint)
            properties[name] = self.schema(bare, f"{cls.__qualname__}.{name}", reply=False)
            if not wrapped_optional and name not in optional:
                required.append(name)
        self._stack.pop()
        schema: dict[str, Any] = {"title": cls.__qualname__, "type": "object"}
        if required:
            schema["required"] = required
        schema["properties"] = properties
        schema["additionalProperties"] = False
        return schema

    @staticmethod
    def _unwrap(hint: Any) -> tuple[Any, bool]:
        optional = False
        while typing.get_origin(hint) in _WRAPPERS:
            optional = optional or typing.get_origin(hint) is typing_extensions.NotRequired
            hint = typing.get_args(hint)[0]
        return hint, optional

    def schema(self, hint: Any, where: str, *, reply: bool) -> dict[str, Any]:
        """The schema of one type hint (``reply``: of a resource's attribute)."""
        hint, _ = self._unwrap(hint)
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in _UNIONS:
            return self._union(args, where, reply=reply)
        if origin is typing.Literal:
            return _literal_schema(args)
        if hint is str:
            return {"type": "string"}
        if hint is bool:
            return {"type": "boolean"}
        if hint is int:
            return {"type": "integer"}
        if hint is float:
            return {"type": "number"}
        if hint is decimal.Decimal:
            return {"type": "string", "format": "decimal"}
        if hint is Any or hint is object:
            return {}
        if origin in (list, Sequence) or origin is typing.List:  # noqa: UP006
            return {"type": "array", "items": self.schema(args[0], f"{where}[]", reply=reply)}
        name = getattr(origin or hint, "__name__", "")
        if origin is dict or name in ("UntypedStripeObject", "Mapping"):
            values = self.schema(args[-1], f"{where}{{}}", reply=reply) if args else {}
            return {"type": "object", "additionalProperties": values}
        if name == "ListObject":
            items = self.schema(args[0], f"{where}[]", reply=reply) if args else {}
            return _list_schema(items)
        if name == "ExpandableField":
            return {"anyOf": [{"type": "string"}, self.schema(args[0], where, reply=reply)]}
        if isinstance(hint, type) and typing_extensions.is_typeddict(hint):
            return self.params(hint)
        if isinstance(hint, type) and reply:
            return self._stripe_object(hint, where)
        msg = f"{where}: no schema for the type {hint!r}"
        raise VendorError(msg)

    def _union(self, args: Sequence[Any], where: str, *, reply: bool) -> dict[str, Any]:
        nullable = type(None) in args
        members = [a for a in args if a is not type(None)]
        emptyable = any(
            typing.get_origin(a) is typing.Literal and typing.get_args(a) == ("",) for a in members
        )
        members = [a for a in members if typing.get_args(a) != ("",)]
        literals = [
            v for a in members if typing.get_origin(a) is typing.Literal for v in a.__args__
        ]
        if literals:
            members = [a for a in members if typing.get_origin(a) is not typing.Literal]
            if all(isinstance(v, str) for v in literals):
                members = [a for a in members if a is not str]  # the SDK's open-enum widening
        schemas = [_literal_schema(literals)] if literals else []
        for member in members:
            schemas.append(self.schema(member, where, reply=reply))
        if emptyable:
            schemas.append({"type": "string", "enum": [""]})
        unique = list({_key(s): s for s in schemas}.values())
        result = unique[0] if len(unique) == 1 else {"anyOf": unique}
        if nullable:
            result = {**result, "nullable": True}
        return result

    # replies
    def resource(self, cls: type) -> dict[str, Any]:
        """The schema of a resource class's object (``x-resourceId`` its ``object`` value)."""
        schema = self._attributes(cls, cls.__qualname__)
        return {"x-resourceId": cls.OBJECT_NAME, **schema}  # type: ignore[attr-defined]

    def _stripe_object(self, cls: type, where: str) -> dict[str, Any]:
        object_name = getattr(cls, "OBJECT_NAME", None)
        if isinstance(object_name, str):
            self.refs.add(object_name)
            return {"$ref": _REF + object_name}
        if cls in self._stack:
            return {"type": "object"}
        self._stack.append(cls)
        try:
            return self._attributes(cls, where)
        finally:
            self._stack.pop()

    def _attributes(self, cls: type, where: str) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        # Only the class's own attributes: its bases (StripeObject, …) annotate the SDK's state.
        own = set(vars(cls).get("__annotations__", {}))
        for name, hint in sorted(self.hints(cls).items()):
            if name not in own or name.startswith("_") or name.isupper():
                continue
            if typing.get_origin(hint) is typing.ClassVar:
                continue
            properties[name] = self.schema(hint, f"{where}.{name}", reply=True)
            if not (typing.get_origin(hint) in _UNIONS and type(None) in typing.get_args(hint)):
                required.append(name)
        schema: dict[str, Any] = {"type": "object"}
        if required:
            schema["required"] = required
        schema["properties"] = properties
        return schema


def _list_schema(items: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data", "has_more", "object", "url"],
        "properties": {
            "data": {"type": "array", "items": items},
            "has_more": {"type": "boolean"},
            "object": {"type": "string", "enum": ["list"]},
            "url": {"type": "string"},
        },
    }


def _find_class(stripe: types.ModuleType, dotted: str) -> type:
    module_name, _, qualname = dotted.partition(":")
    node: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        node = getattr(node, part)
    if not isinstance(node, type):
        msg = f"{dotted} is not a class in stripe-python {stripe.VERSION}"
        raise VendorError(msg)
    return node


def _resource_class(stripe: types.ModuleType, object_name: str) -> type:
    classes = importlib.import_module("stripe._object_classes")
    table = dict(classes.OBJECT_CLASSES)
    table.update(getattr(classes, "V2_OBJECT_CLASSES", {}))
    entry = table.get(object_name)
    if entry is None:
        msg = f"stripe-python {stripe.VERSION} has no class for the object {object_name!r}"
        raise VendorError(msg)
    if isinstance(entry, tuple):
        return _find_class(stripe, f"{entry[0]}:{entry[1]}")
    return typing.cast(type, entry)


def from_sdk(stripe: types.ModuleType) -> tuple[str, dict[str, Any], str]:
    """The request and reply schemas stripe-python (the one imported as ``stripe``) carries for
    ``SDK_ENDPOINTS``, as an excerpt: its file name, the document, and the SHA-256 of the SDK
    modules read."""
    version = str(stripe.VERSION)
    api_version = str(importlib.import_module("stripe._api_version")._ApiVersion.CURRENT)
    # stripe-python's params moved from classes nested in the resources to ``stripe.params``
    # during 12.x; usage records left with API basil.
    modern = importlib.util.find_spec("stripe.params") is not None
    basil = api_version[:10] >= "2025-03-31"
    translate = SdkTranslator(stripe)
    paths: dict[str, dict[str, Any]] = {}
    replies: set[str] = set()
    for (method, template), (new, old, reply, listed) in SDK_ENDPOINTS.items():
        dotted = new if modern else old
        if dotted is None or (basil and reply.startswith("usage_record")):
            continue
        cls = _find_class(stripe, dotted)
        body = translate.params(cls)
        operation: dict[str, Any] = {"x-stripe-python-params": dotted.replace(":", ".")}
        if method == "GET":
            required = set(body.get("required", []))
            operation["parameters"] = [
                {"name": name, "in": "query", "required": name in required, "schema": schema}
                for name, schema in body["properties"].items()
            ]
        else:
            media = "application/json" if template.startswith("/v2/") else FORM
            operation["parameters"] = []
            operation["requestBody"] = {"content": {media: {"schema": body}}}
        if reply in SDK_OBJECTS or reply.startswith("v2."):
            item = {"$ref": _REF + reply}
            translate.refs.add(reply)
            schema = _list_schema(item) if listed else item
            ok = {"description": "Successful response.", "content": {JSON: {"schema": schema}}}
            operation["responses"] = {"200": ok}
            replies.add(reply)
        paths.setdefault(template, {})[method.lower()] = operation
    objects: dict[str, Any] = {}
    while wanted := [
        name
        for name in SDK_OBJECTS
        if (name in replies or name in translate.refs) and name not in objects
    ]:
        for name in wanted:
            objects[name] = translate.resource(_resource_class(stripe, name))
    objects = dict(sorted(objects.items()))
    unresolved = sorted(translate.refs - set(objects))
    sources = "".join(inspect.getsource(sys.modules[name]) for name in sorted(translate.modules))
    document = {
        "source": (
            f"stripe-python {version} (PyPI package `stripe`), whose typed params and resource "
            f"classes are generated from Stripe's OpenAPI spec for API {api_version}: derived by "
            "scripts/vendor_stripe_spec.py --from-sdk"
        ),
        "derived_from": {"package": "stripe", "version": version, "api_version": api_version},
        "openapi": "3.0.0",
        "api_version": api_version,
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": objects},
        "unresolved_schemas": unresolved,
    }
    return f"sdk_{api_version}.json", document, sha256(sources)


FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


def record(name: str, document: dict[str, Any], input_sha: str) -> dict[str, Any]:
    """The manifest entry of one vendored document."""
    text = dump(document)
    objects = [
        str(node["x-resourceId"])
        for node in _walk(document)
        if isinstance(node, dict) and isinstance(node.get("x-resourceId"), str)
    ]
    return {
        "file": name,
        "source": document["source"],
        "api_versions": versions_of(document, name),
        "input_sha256": input_sha,
        "vendored_sha256": sha256(text),
        "paths": sorted(document.get("paths", {})),
        "objects": sorted(set(objects)) or sorted(document.get("resources", {})),
        **({"derived_from": document["derived_from"]} if "derived_from" in document else {}),
    }


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def write(out: Path, documents: dict[str, tuple[dict[str, Any], str]]) -> None:
    """Write every document and the manifest (names sorted, so reruns diff cleanly)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in sorted(documents):
        document, input_sha = documents[name]
        (out / name).write_text(dump(document))
        entries.append(record(name, document, input_sha))
    manifest = {
        "generated_by": "scripts/vendor_stripe_spec.py",
        "licence": "Stripe's OpenAPI documents (github.com/stripe/openapi) are MIT-licensed.",
        "documents": entries,
    }
    (out / MANIFEST).write_text(dump(manifest))


def main(argv: Sequence[str] | None = None) -> int:
    """Vendor the given excerpts and cuts; print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--excerpts", type=Path, help="a folder of excerpt JSON files to copy")
    parser.add_argument("--from-spec", type=Path, help="a published Stripe OpenAPI document")
    parser.add_argument("--paths", nargs="*", default=[], help="paths to cut from --from-spec")
    parser.add_argument("--name", help="file name of the cut excerpt (…_<api version>.json)")
    parser.add_argument("--source", help="what --from-spec is: repository, path, commit")
    parser.add_argument(
        "--from-sdk",
        action="store_true",
        help="derive schemas from the stripe-python that `import stripe` finds (sdk_<version>.json)",
    )
    parser.add_argument(
        "--keep", nargs="*", default=[], help="vendored files to keep as they are (cut earlier)"
    )
    parser.add_argument(
        "--out", type=Path, default=OUT, help="where to write (stripe_standin/spec)"
    )
    args = parser.parse_args(argv)
    documents: dict[str, tuple[dict[str, Any], str]] = {}
    try:
        if args.excerpts is not None:
            for path in sorted(args.excerpts.glob("*.json")):
                raw = path.read_bytes()
                document = json.loads(raw)
                versions_of(document, path.name)
                documents[path.name] = (document, sha256(raw))
        if args.from_spec is not None:
            if not (args.paths and args.name and args.source):
                msg = "--from-spec needs --paths, --name and --source"
                raise VendorError(msg)
            raw = args.from_spec.read_bytes()
            document = extract(json.loads(raw), args.paths, source=args.source, name=args.name)
            documents[args.name] = (document, sha256(raw))
        if args.from_sdk:
            import stripe

            name, document, digest = from_sdk(stripe)
            documents[name] = (document, digest)
        previous = _previous_inputs(args.out)
        for name in args.keep:
            path = args.out / name
            if not path.is_file():
                msg = f"--keep {name}: no such vendored file in {args.out}"
                raise VendorError(msg)
            documents[name] = (json.loads(path.read_text()), previous.get(name, ""))
    except (OSError, ValueError, VendorError) as exc:
        print(f"vendor-stripe-spec: {exc}", file=sys.stderr)
        return 2
    if not documents:
        print("vendor-stripe-spec: nothing to vendor (give --excerpts, --from-spec or --from-sdk)")
        return 2
    write(args.out, documents)
    for name in sorted(documents):
        print(f"wrote {args.out / name}")
    return 0


def _previous_inputs(out: Path) -> dict[str, str]:
    """The input digests the manifest recorded last time (kept files keep theirs)."""
    path = out / MANIFEST
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text()).get("documents", [])
    return {entry["file"]: entry["input_sha256"] for entry in entries}


if __name__ == "__main__":
    sys.exit(main())
