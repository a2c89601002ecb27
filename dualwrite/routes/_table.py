"""The route table: which requests of the user's app report usage, matched by method and path.

``RouteTable`` answers "is this a usage request?" for every request the middleware sees, so a miss
is kept cheap: routes are indexed by method, and a path that starts with none of the routes' literal
prefixes is turned away by one ``str.startswith`` before any regular expression runs. Templates are
compiled by Starlette's own ``compile_path`` and matched the way Starlette's router matches them
(``GET`` routes also answer ``HEAD``; no trailing-slash folding), so the middleware sees exactly the
requests the app's handler would. Each route's field sources are checked here, at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from starlette.convertors import CONVERTOR_TYPES
from starlette.routing import PARAM_REGEX, compile_path

from dualwrite.config import FieldSource, UsageRoute
from dualwrite.exceptions import ConfigError, UsageInputError
from dualwrite.models import UsageEvent
from dualwrite.routes._fields import EVENT_FIELDS, FIELD_PARSERS, pydantic_message
from dualwrite.routes._match import RouteMatch

__all__ = ["RouteMatch", "RouteTable"]

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


_Entry = tuple[str, re.Pattern[str], UsageRoute]
"""A compiled route: its literal prefix (checked before the regex), its regex and the route."""


class RouteTable:
    """The configured usage routes, compiled once; ``match`` finds the route a request belongs to.

    Routes are tried in configuration order and the first match wins. Methods are compared exactly
    (HTTP methods are case-sensitive and ASGI delivers them upper-case); ``path`` is the ASGI route
    path (``scope["path"]`` without ``root_path``), already percent-decoded.

    Raises:
        ConfigError: a template uses an unknown convertor or repeats a parameter, a field reads a
            path parameter the template lacks, a route mixes JSON and form sources, or a constant
            is not a valid value for its field.
    """

    __slots__ = ("_by_method", "_routes")

    def __init__(self, routes: Sequence[UsageRoute]) -> None:
        by_method: dict[str, list[_Entry]] = {}
        for route in routes:
            entry = _compile(route)
            methods = (route.method, "HEAD") if route.method == "GET" else (route.method,)
            for method in methods:
                by_method.setdefault(method, []).append(entry)
        self._routes = tuple(routes)
        # method -> (every literal prefix, for one C-level startswith; the entries, in order)
        self._by_method: dict[str, tuple[tuple[str, ...], tuple[_Entry, ...]]] = {
            method: (tuple({entry[0]: None for entry in entries}), tuple(entries))
            for method, entries in by_method.items()
        }

    @property
    def routes(self) -> tuple[UsageRoute, ...]:
        """The routes, in the order they are tried."""
        return self._routes

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The first route matching ``method`` and ``path``, or ``None`` (pass the request on)."""
        indexed = self._by_method.get(method)
        if indexed is None:
            return None
        prefixes, entries = indexed
        if not path.startswith(prefixes):
            return None
        for prefix, regex, route in entries:
            # Starlette's own test (re.match with "$"), so a trailing newline matches as it does there.
            if path.startswith(prefix) and (found := regex.match(path)) is not None:
                return RouteMatch(route, found.groupdict())
        return None


def _compile(route: UsageRoute) -> _Entry:
    where = f"route {route.method} {route.path}"
    params = list(PARAM_REGEX.finditer(route.path))
    for param in params:
        convertor = (param.group(2) or ":str")[1:]
        if convertor not in CONVERTOR_TYPES:
            known = ", ".join(sorted(CONVERTOR_TYPES))
            msg = f"{where}: unknown path convertor {convertor!r}; use one of {known}"
            raise ConfigError(msg)
    try:
        regex, _, convertors = compile_path(route.path)
    except ValueError as exc:
        msg = f"{where}: {exc}"
        raise ConfigError(msg) from None
    kinds = set()
    for field in EVENT_FIELDS:
        source: FieldSource | None = getattr(route, field)
        if source is None:
            continue
        kinds.add(source.kind)
        _check_source(where, field, source, convertors)
    if {"json", "form"} <= kinds:
        msg = f"{where}: reads both json: and form: fields, but a body is one or the other"
        raise ConfigError(msg)
    _check_constants(where, route)
    prefix = route.path[: params[0].start()] if params else route.path
    return prefix, regex, route


def _check_source(
    where: str, field: str, source: FieldSource, convertors: Mapping[str, Any]
) -> None:
    problem = None
    if source.kind == "path" and source.name not in convertors:
        problem = f"the template has no path parameter {source.name!r}"
    elif source.kind == "json" and "" in source.name.split("."):
        problem = f"{source.name!r} has an empty segment; write dotted names like usage.quantity"
    elif source.kind == "header" and not _TOKEN_RE.fullmatch(source.name):
        problem = f"{source.name!r} is not a valid header name"
    elif source.kind == "const" and field == "identifier":
        problem = "a constant identifier would make every event a duplicate of the first"
    elif source.kind == "const" and field == "timestamp" and source.name != "now":
        problem = "the only constant timestamp is 'now'"
    if problem:
        msg = f"{where}: {field} = {source.kind}:{source.name}: {problem}"
        raise ConfigError(msg)


def _check_constants(where: str, route: UsageRoute) -> None:
    """Refuse at start-up a constant that would make every request fail."""
    values: dict[str, object] = {}
    for field in ("customer", "event_name", "subscription_item", "quantity", "action"):
        source: FieldSource | None = getattr(route, field)
        if source is None or source.kind != "const":
            continue
        try:
            values[field] = FIELD_PARSERS[field](source.name, field)
        except UsageInputError as exc:
            msg = f"{where}: constant {exc.message}"
            raise ConfigError(msg) from None
    probe = {"identifier": "p", "customer": "p", "event_name": "p", "quantity": 0, "timestamp": 1}
    try:
        UsageEvent.model_validate(probe | values)
    except ValidationError as exc:
        field, reason = pydantic_message(exc)
        msg = f"{where}: constant {field} is invalid: {reason}"
        raise ConfigError(msg) from None
