"""A pytest plugin for ``scripts/mutation`` only (``-p tests.mutation_plugin`` in ``[tool.mutmut]``).

mutmut runs the suite once to map tests to functions, then forks that process for every mutant and
runs the covering tests in a new pytest session. Hypothesis remembers, per test method, the
instance it first ran on; the forked session's instance is another one, and the
``differing_executors`` health check fails the test before it runs. That check guards against a
test class shared by several runners, which cannot happen in one mutant's run: it is switched off
here, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import hypothesis.core
from hypothesis import HealthCheck
from hypothesis.internal.healthcheck import fail_health_check


def _fail_unless_differing_executors(settings: Any, message: str, label: HealthCheck) -> None:
    """Hypothesis's own health check failure, except for ``differing_executors``."""
    if label is not HealthCheck.differing_executors:
        fail_health_check(settings, message, label)


vars(hypothesis.core)["fail_health_check"] = _fail_unless_differing_executors
