"""Stripe's published OpenAPI excerpts, vendored in ``stripe_standin/spec/``, as an index.

``scripts/vendor_stripe_spec.py`` writes the documents and ``spec/MANIFEST.json``. Each document
describes one API version. Which one judges a call depends on the call's ``Stripe-Version``:

* a document of a version before ``2025-03-31.basil`` (the usage records and the objects excerpts,
  API 2023-08-16, the newest published with usage records) judges only pre-basil calls: basil
  removed usage records and ``aggregate_usage``, so it no longer describes newer replies;
* a document of basil or later (meters and API v2, test clocks) judges every call: issue 15 has
  meters and v2 checked against the current version whatever the caller pins.

Documents derived from stripe-python's typed params and resource classes (``derived_from``; made
by the script's ``--from-sdk``) sit beside the published excerpts. Where several documents hold
an operation or object, the one of the caller's era wins, then (for replies and objects only) a
published one over a derived one (a published schema says which keys are always there; the SDK
cannot), then the one whose version is nearest the caller's.

Schemas are looked up per document (a ``$ref`` means what that document's version meant by it):
under ``components.schemas`` and wherever the excerpt resolved one in place (``x-resolved-from``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

__all__ = [
    "SPEC_DIR",
    "Document",
    "Operation",
    "documents",
    "find_operation",
    "normalise",
    "object_schema",
    "operations",
]

SPEC_DIR = Path(__file__).with_name("spec")
"""Where the vendored documents live (package data)."""
BASIL = "2025-03-31"
_REF = "#/components/schemas/"
_VERSION_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})")


@dataclass(frozen=True)
class Document:
    """One vendored document: its version, operations and schemas."""

    name: str
    api_version: str
    paths: Mapping[str, Mapping[str, Any]]
    schemas: Mapping[str, Mapping[str, Any]] = field(repr=False)
    derived: bool = False
    """Whether it was derived from stripe-python rather than cut from a published document."""

    @property
    def pre_basil(self) -> bool:
        """Whether the document describes an API version before basil."""
        return _date(self.api_version) < BASIL

    def judges(self, version: str) -> bool:
        """Whether this document judges a call made with ``Stripe-Version: version``."""
        return not self.pre_basil or _date(version) < BASIL

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The schema a ``$ref`` names in this document, the schema itself if it is none, or
        None when the document does not hold it (then nothing can be said)."""
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        return self.schemas.get(ref[len(_REF) :]) if ref.startswith(_REF) else None


@dataclass(frozen=True)
class Operation:
    """One operation of a document, found for a concrete request path."""

    document: Document
    method: str
    template: str
    spec: Mapping[str, Any]

    @property
    def key(self) -> str:
        """``METHOD /path/{template}`` as the document writes it."""
        return f"{self.method} {self.template}"

    def request_schema(self, *, json_body: bool) -> dict[str, Any]:
        """The operation's parameters as one object schema: the query ones (every method) and,
        but for GET and DELETE, the body's (its JSON schema for API v2, else its form)."""
        properties: dict[str, Any] = {}
        required: list[str] = []
        for param in self.spec.get("parameters", []):
            if param.get("in") == "query":
                properties[param["name"]] = param.get("schema", {})
                if param.get("required"):
                    required.append(param["name"])
        if self.method not in ("GET", "DELETE"):
            content = (self.spec.get("requestBody") or {}).get("content", {})
            media = "application/json" if json_body else "application/x-www-form-urlencoded"
            body = content.get(media, {}).get("schema", {})
            properties.update(body.get("properties", {}))
            required += body.get("required", [])
        return {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }

    def reply_schema(self, status: int) -> Mapping[str, Any] | None:
        """The schema of a reply with ``status`` (``200``, else the ``default`` error reply)."""
        responses = self.spec.get("responses", {})
        response = responses.get(str(status)) or (
            None if status == 200 else responses.get("default")
        )
        if response is None:
            return None
        content = response.get("content", {}).get("application/json", {})
        schema = content.get("schema")
        return schema if isinstance(schema, Mapping) else None


def _date(version: str) -> str:
    match = _VERSION_DATE.match(version)
    return match.group(1) if match else version


def normalise(path: str) -> str:
    """A path template with its variables blanked, so ``{id}`` matches ``{customer}``."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def _collect(node: Any, into: dict[str, Mapping[str, Any]]) -> None:
    """Every schema an excerpt resolved in place, by name."""
    if isinstance(node, dict):
        origin = node.get("x-resolved-from")
        if isinstance(origin, str) and origin.startswith(_REF):
            into.setdefault(origin[len(_REF) :], node)
        for value in node.values():
            _collect(value, into)
    elif isinstance(node, list):
        for value in node:
            _collect(value, into)


def _load(path: Path) -> Document | None:
    data = json.loads(path.read_text())
    if "paths" not in data or not isinstance(data.get("api_version"), str):
        return None  # the fixtures: example objects, not schemas
    schemas: dict[str, Mapping[str, Any]] = dict(data.get("components", {}).get("schemas", {}))
    _collect(data["paths"], schemas)
    derived = "derived_from" in data
    return Document(path.name, data["api_version"], data["paths"], schemas, derived)


@functools.cache
def documents() -> tuple[Document, ...]:
    """Every vendored document holding operations, newest version first."""
    found = [doc for path in sorted(SPEC_DIR.glob("*.json")) if (doc := _load(path)) is not None]
    return tuple(sorted(found, key=lambda doc: _date(doc.api_version), reverse=True))


@functools.cache
def _templates() -> tuple[tuple[re.Pattern[str], str, Document], ...]:
    patterns = []
    for doc in documents():
        for template in doc.paths:
            regex = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            patterns.append((re.compile(regex), template, doc))
    return tuple(patterns)


def _rank(doc: Document, version: str, *, reply: bool) -> tuple[bool, bool, int]:
    """Sort key of the documents judging a call made with ``version``: the caller's era first,
    then (replies) published before derived, then the nearest version."""
    era = doc.pre_basil != (_date(version) < BASIL)
    return era, reply and doc.derived, _distance(doc.api_version, version)


def _distance(a: str, b: str) -> int:
    try:
        return abs((date.fromisoformat(_date(a)) - date.fromisoformat(_date(b))).days)
    except ValueError:
        return 1 << 30


@functools.lru_cache(maxsize=4096)
def find_operation(
    method: str, path: str, version: str, *, reply: bool = False
) -> Operation | None:
    """The operation that judges ``method path`` made with ``version`` (its request, or with
    ``reply`` its reply), or None if none does."""
    wanted = method.lower()
    found: list[Operation] = []
    for pattern, template, doc in _templates():
        if not pattern.match(path) or not doc.judges(version):
            continue
        spec = doc.paths[template].get(wanted)
        if not isinstance(spec, Mapping) or (reply and "200" not in spec.get("responses", {})):
            continue
        found.append(Operation(doc, method.upper(), template, spec))
    if not found:
        return None
    return min(found, key=lambda op: _rank(op.document, version, reply=reply))


@functools.lru_cache(maxsize=256)
def object_schema(object_type: str, version: str) -> tuple[Document, Mapping[str, Any]] | None:
    """The schema of a Stripe object (by its ``object`` value) that judges ``version``."""
    holding = [doc for doc in documents() if doc.judges(version) and object_type in doc.schemas]
    if not holding:
        return None
    doc = min(holding, key=lambda doc: _rank(doc, version, reply=True))
    return doc, doc.schemas[object_type]


def operations() -> Iterator[tuple[str, str, Document]]:
    """Every ``(METHOD, template, document)`` the vendored documents hold."""
    for doc in documents():
        for template, item in doc.paths.items():
            for method, spec in item.items():
                if isinstance(spec, Mapping) and "responses" in spec:
                    yield method.upper(), template, doc
