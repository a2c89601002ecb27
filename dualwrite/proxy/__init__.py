"""The proxy: a drop-in Stripe API endpoint, so that any app, in any language, dual-writes by
changing one setting (its Stripe SDK's API base).

Every request is forwarded, streamed, to ``settings.stripe.api_base`` and nowhere else, except
``POST /v1/subscription_items/{si}/usage_records``, which the engine records at the customer's
stage::

    from dualwrite.config import Settings
    from dualwrite.proxy import create_proxy_app

    app = create_proxy_app(Settings.load("dualwrite.toml"))   # any ASGI server

or ``dualwrite serve --config dualwrite.toml``, or
``uvicorn --factory dualwrite.proxy:create_app --no-server-header --no-date-header --http httptools
--loop uvloop``.

Modules: ``_app`` (routing, lifespan, health), ``_upstream`` (forwarding, on aiohttp),
``_headers`` (which headers cross), ``_usage`` (interception and replies), ``_items``
(subscription item → customer and meter), ``_server`` (uvicorn on httptools and uvloop),
``_protocol`` (the HTTP limits), ``_fast`` (forwarded requests relayed as bytes, without ASGI, on
``_pool``'s keep-alive connections; ``[proxy] fast_path``).
"""

from __future__ import annotations

from dualwrite.proxy._app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_USAGE_BODY_BYTES,
    HEALTH_PATH,
    ProxyApp,
    create_app,
    create_proxy_app,
)
from dualwrite.proxy._items import ItemResolver
from dualwrite.proxy._server import RunningProxy, run_proxy, serve_proxy
from dualwrite.proxy._usage import record_id

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_USAGE_BODY_BYTES",
    "HEALTH_PATH",
    "ItemResolver",
    "ProxyApp",
    "RunningProxy",
    "create_app",
    "create_proxy_app",
    "record_id",
    "run_proxy",
    "serve_proxy",
]
