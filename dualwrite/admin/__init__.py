"""The admin HTTP API: ``dualwrite flags``, the cutover operations and the reconciliation records
as JSON, behind a token.

``dualwrite serve`` serves it under ``/_dualwrite/admin/``, and any Starlette or FastAPI app can
mount it::

    from starlette.routing import Mount
    from dualwrite.admin import admin_app

    routes = [..., Mount("/_dualwrite/admin", admin_app(settings))]  # engine=... shares its Redis

Modules: ``_app`` (the app), ``_api`` (endpoints as data: validation, errors, OpenAPI),
``_flags`` (the flag operations; their models in ``_flag_models``), ``_cutover`` (rollout,
cutover, rollback, guard), ``_reconcile`` (the reconciliation records, with their money); the
token gate is ``BearerGate`` (``dualwrite._bearer``, which ``/metrics`` uses too). More groups of
operations are an ``Endpoint`` tuple each, added to ``DEFAULT_ENDPOINTS``.
"""

from __future__ import annotations

from dualwrite._bearer import BearerGate
from dualwrite.admin._api import AdminContext, ApiError, Call, Endpoint, ErrorBody
from dualwrite.admin._app import DEFAULT_ENDPOINTS, OPENAPI_PATH, AdminApp, admin_app
from dualwrite.admin._cutover import CUTOVER_ENDPOINTS
from dualwrite.admin._flags import FLAG_ENDPOINTS
from dualwrite.admin._reconcile import RECONCILE_ENDPOINTS

__all__ = [
    "CUTOVER_ENDPOINTS",
    "DEFAULT_ENDPOINTS",
    "FLAG_ENDPOINTS",
    "OPENAPI_PATH",
    "RECONCILE_ENDPOINTS",
    "AdminApp",
    "AdminContext",
    "ApiError",
    "BearerGate",
    "Call",
    "Endpoint",
    "ErrorBody",
    "admin_app",
]
