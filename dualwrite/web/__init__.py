"""The report as web pages: an ASGI app behind a bearer token, served by the proxy under
``/_dualwrite/`` and mountable in any Starlette or FastAPI app::

    from starlette.routing import Mount
    from dualwrite.web import report_app

    routes = [..., Mount("/_dualwrite", report_app(settings))]

Modules: ``_app`` (the pages), ``_auth`` (the token gate), ``_views`` (filters, summaries),
``_chart`` (divergences over time as SVG bars), ``_render`` (Jinja2, autoescaped and redacted);
templates under ``templates/``. No JavaScript, no build step.
"""

from __future__ import annotations

from dualwrite.web._app import ReportApp, report_app
from dualwrite.web._auth import COOKIE_NAME, LOGIN_PATH, TokenGate

__all__ = ["COOKIE_NAME", "LOGIN_PATH", "ReportApp", "TokenGate", "report_app"]
