"""Usage routes: which requests of the user's app report usage, and how each becomes a UsageEvent.

* ``RouteTable`` (``_table``): the configured routes, compiled and checked once; ``match`` finds
  the route a request belongs to (method and path template, as Starlette's router matches them).
* ``build_event`` (``_fields``): reads each event field from where the route says (path, query,
  json, form, header, const) and refuses anything doubtful with a ``UsageInputError``.
* ``RouteMatch`` (``_match``): a matched request, what the table hands ``build_event``.
"""

from __future__ import annotations

from dualwrite.routes._fields import IDEMPOTENCY_HEADER, MAX_FUTURE_SECONDS, build_event
from dualwrite.routes._match import RouteMatch
from dualwrite.routes._table import RouteTable

__all__ = ["IDEMPOTENCY_HEADER", "MAX_FUTURE_SECONDS", "RouteMatch", "RouteTable", "build_event"]
