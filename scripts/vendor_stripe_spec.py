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
import copy
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
        print("vendor-stripe-spec: nothing to vendor (give --excerpts or --from-spec)")
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
