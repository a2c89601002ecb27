"""schemathesis against the admin API's own OpenAPI document, over a real socket.

The admin API is served by uvicorn in a thread (its own event loop, its own Redis connections) under
the test's key prefix; schemathesis reads the document the API serves and sends generated requests,
valid and invalid, to every operation, checking each response against the document: no 5xx, only
documented status codes, bodies and content types as described, and schema-invalid requests refused.

One check is left out: "schema-valid data is accepted". The operations enforce rules a JSON schema
cannot state (one stage forward unless ``force``, a rollout percentage never lowered, a schedule in
the future), so a schema-valid request may rightly get a Stripe-style 400; what the document can say
(types, bounds, exactly one of ``percent`` or ``customers``) it says, and tests/admin/test_admin*.py check
those refusals one by one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from dualwrite.admin import admin_app
from dualwrite.testing import serve_app
from tests.admin.test_admin import AUTH, admin_settings

#: Generated requests per operation; raise it to explore further (``DUALWRITE_FUZZ_EXAMPLES=500``).
EXAMPLES = int(os.environ.get("DUALWRITE_FUZZ_EXAMPLES", "25"))


@pytest.fixture
def admin_url(redis_url: str, key_prefix: str) -> Iterator[str]:
    """The admin API served on loopback, with its token, under this test's key prefix."""
    app = admin_app(admin_settings(redis_url, key_prefix))
    with serve_app(app, lifespan=True) as url:
        yield url


@pytest.fixture
def admin_schema(admin_url: str) -> OpenApiSchema:
    """The document the running API serves (behind its token), as schemathesis reads it."""
    document = httpx.get(f"{admin_url}/openapi.json", headers=AUTH, timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=admin_url, headers=AUTH)
    return schema


# Driven by hand rather than through schemathesis' pytest plugin, whose fixture loader reads a
# pytest internal (``Function._nodeid``) that the pytest in use no longer has.
def test_every_operation_conforms(admin_schema: OpenApiSchema) -> None:
    """Generated requests to every operation: each answer is one the document describes."""
    operations = []
    for result in admin_schema.get_all_operations():
        assert isinstance(result, Ok), (
            f"the document has an operation schemathesis cannot read: {result}"
        )
        operations.append(result.ok())
    assert len(operations) >= 17, "the document lost operations"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def conforms(case: Any) -> None:
            case.call_and_validate(
                headers=AUTH, timeout=10, excluded_checks=[positive_data_acceptance]
            )

        try:
            conforms()
        except Exception as exc:
            exc.add_note(f"operation: {operation.label}")
            raise
