"""The vendored OpenAPI excerpts: in the repository, recorded in the manifest, made by the script."""

from __future__ import annotations

import importlib.util
import json
import shutil
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any, List, Literal, NotRequired, Union  # noqa: UP035 (as stripe-python writes them)

import pytest
import stripe
from typing_extensions import TypedDict

from stripe_standin._openapi import SPEC_DIR, documents

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vendor_stripe_spec.py"


@pytest.fixture(scope="module")
def vendor() -> ModuleType:
    """``scripts/vendor_stripe_spec.py`` as a module."""
    spec = importlib.util.spec_from_file_location("vendor_stripe_spec", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest() -> dict[str, Any]:
    return dict(json.loads((SPEC_DIR / "MANIFEST.json").read_text()))


class TestVendoredCopies:
    """What is in ``stripe_standin/spec/``."""

    def test_every_document_is_in_the_manifest_with_its_version(self) -> None:
        """Each vendored file has a manifest entry naming its source and API version(s)."""
        entries = {entry["file"]: entry for entry in _manifest()["documents"]}
        files = {p.name for p in SPEC_DIR.glob("*.json")} - {"MANIFEST.json"}
        assert set(entries) == files
        for entry in entries.values():
            assert entry["source"] and entry["api_versions"]

    def test_copies_are_unedited(self, vendor: ModuleType) -> None:
        """Each file is byte for byte what the script wrote (its digest is in the manifest)."""
        for entry in _manifest()["documents"]:
            text = (SPEC_DIR / entry["file"]).read_text()
            assert vendor.sha256(text) == entry["vendored_sha256"], entry["file"]

    def test_documents_for_usage_records_meters_v2_and_test_clocks(self) -> None:
        """The index holds the pre-basil usage records and current meters, v2 and test clocks."""
        by_path = {path: doc for doc in documents() for path in doc.paths}
        assert by_path["/v1/subscription_items/{subscription_item}/usage_records"].pre_basil
        assert not by_path["/v1/billing/meter_events"].pre_basil
        assert not by_path["/v2/billing/meter_event_stream"].pre_basil
        assert not by_path["/v1/test_helpers/test_clocks/{test_clock}/advance"].pre_basil

    def test_the_script_reproduces_the_copies(self, vendor: ModuleType, tmp_path: Path) -> None:
        """Vendoring the vendored files again rewrites them unchanged (they are script output)."""
        sources = tmp_path / "in"
        sources.mkdir()
        for path in SPEC_DIR.glob("*.json"):
            if path.name != "MANIFEST.json":
                shutil.copy(path, sources / path.name)
        assert vendor.main(["--excerpts", str(sources), "--out", str(tmp_path / "out")]) == 0
        for path in sources.iterdir():
            assert (tmp_path / "out" / path.name).read_text() == path.read_text(), path.name


SPEC = {
    "openapi": "3.0.0",
    "info": {"version": "2026-09-30.endive"},
    "paths": {
        "/v1/things/{thing}": {
            "get": {
                "responses": {
                    "200": {
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/thing"}}
                        }
                    },
                    "default": {
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/error"}}
                        }
                    },
                }
            }
        },
        "/v1/other": {"get": {"responses": {}}},
    },
    "components": {
        "schemas": {
            "thing": {
                "type": "object",
                "properties": {"part": {"$ref": "#/components/schemas/part"}},
            },
            "part": {
                "type": "object",
                "properties": {"deep": {"$ref": "#/components/schemas/deep"}},
            },
            "deep": {"type": "string"},
            "unrelated": {"type": "string"},
        }
    },
}


class TestCutting:
    """``--from-spec``: cutting an excerpt out of a published document."""

    def test_cut_resolves_responses_and_keeps_what_they_reference(self, vendor: ModuleType) -> None:
        """The 200 schema is resolved in place; nested references are kept; others are not."""
        cut = vendor.extract(SPEC, ["/v1/things/{thing}"], source="test", name="things.json")
        reply = cut["paths"]["/v1/things/{thing}"]["get"]["responses"]
        schema = reply["200"]["content"]["application/json"]["schema"]
        assert schema["x-resolved-from"] == "#/components/schemas/thing"
        assert set(cut["components"]["schemas"]) == {"part", "deep"}
        error = reply["default"]["content"]["application/json"]["schema"]
        assert error["x-unresolved"] == "not present in source spec"
        assert cut["unresolved_schemas"] == ["error"]
        assert (cut["source"], cut["api_version"]) == ("test", "2026-09-30.endive")
        assert list(cut["paths"]) == ["/v1/things/{thing}"]

    def test_a_missing_path_is_refused(self, vendor: ModuleType) -> None:
        """Asking for a path the document lacks names it."""
        with pytest.raises(vendor.VendorError, match="/v1/nothing"):
            vendor.extract(SPEC, ["/v1/nothing"], source="test", name="x.json")

    def test_an_excerpt_without_its_source_is_refused(
        self, vendor: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An excerpt that does not say where it comes from is not vendored."""
        (tmp_path / "anonymous.json").write_text(json.dumps({"paths": {}}))
        assert vendor.main(["--excerpts", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
        assert "anonymous.json: no `source` key" in capsys.readouterr().err


class _Recurring(TypedDict):
    interval: Union[Literal["day", "month"], str]  # noqa: UP007 (as stripe-python writes it)
    usage_type: NotRequired[Literal["licensed", "metered"] | str]


class _Tier(TypedDict):
    up_to: Union[Literal["inf"], int]  # noqa: UP007
    unit_amount_decimal: NotRequired[Decimal]


class _PriceParams(TypedDict):
    currency: str
    metadata: NotRequired[Literal[""] | dict[str, str]]
    recurring: NotRequired[_Recurring]
    tiers: NotRequired[List[_Tier]]  # noqa: UP006
    api_key: NotRequired[str]


class TestFromSdk:
    """``--from-sdk``: stripe-python's type hints turned into the checker's schemas."""

    def test_params_become_a_closed_object_schema(self, vendor: ModuleType) -> None:
        """Required vs NotRequired, Literal|str as an enum, emptyable, nested objects closed,
        lists, anyOf, decimals; the SDK's RequestOptions keys left out."""
        schema = vendor.SdkTranslator(stripe).params(_PriceParams)
        assert schema["required"] == ["currency"] and schema["additionalProperties"] is False
        props = schema["properties"]
        assert set(props) == {"currency", "metadata", "recurring", "tiers"}
        assert props["metadata"] == {
            "anyOf": [
                {"type": "object", "additionalProperties": {"type": "string"}},
                {"type": "string", "enum": [""]},
            ]
        }
        recurring = props["recurring"]
        assert recurring["required"] == ["interval"]
        assert recurring["additionalProperties"] is False
        assert recurring["properties"]["interval"] == {"type": "string", "enum": ["day", "month"]}
        tier = props["tiers"]["items"]["properties"]
        assert tier["up_to"] == {
            "anyOf": [{"type": "string", "enum": ["inf"]}, {"type": "integer"}]
        }
        assert tier["unit_amount_decimal"] == {"type": "string", "format": "decimal"}

    def test_derived_documents_record_their_sdk(self) -> None:
        """Each derived document names the stripe-python version and API version it came from,
        in the manifest and in its own ``source``."""
        derived = [e for e in _manifest()["documents"] if "derived_from" in e]
        assert {e["derived_from"]["version"] for e in derived} == {"11.6.1", "12.0.0", "16.1.0"}
        for entry in derived:
            sdk = entry["derived_from"]
            assert entry["api_versions"] == [sdk["api_version"]]
            assert f"stripe-python {sdk['version']}" in entry["source"]
            assert entry["file"] == f"sdk_{sdk['api_version']}.json"
