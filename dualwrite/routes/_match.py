"""``RouteMatch``: what the route table hands the event builder (a module of its own, so that the
table and the field reading both import it and neither imports the other's caller)."""

from __future__ import annotations

from dataclasses import dataclass

from dualwrite.config import UsageRoute

__all__ = ["RouteMatch"]


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A request that matched a usage route, with its path parameters as raw (unconverted) text."""

    route: UsageRoute
    path_params: dict[str, str]
