"""Every call a stand-in answers, checked against Stripe's published spec: request and reply.

A ``SpecChecker`` sees each ``/v1`` and ``/v2`` call once it is answered. The request is checked
against the request schema of its operation in the vendored spec (a parameter the spec does not
know, a wrong type, a missing required one), and the reply against the reply schema of that
operation and against the schema of every Stripe object inside it, for the caller's API version
(``_openapi`` says which document judges which version). What breaks the spec is kept as a
``Violation``; what the spec does not describe is counted in ``uncovered``, never passed silently.

Install one for every stand-in of the process (the test suite does, per test), or give one to a
single stand-in (``StripeStandin(spec_checker=...)``)::

    checker = SpecChecker()
    previous = install(checker)
    ...                                   # calls to any stand-in
    assert checker.violations == [], checker.report()
    install(previous)

A test that sends a bad request on purpose, to see the stand-in refuse it, says so for exactly
that request: ``with checker.expect_invalid_requests(): ...`` (the block fails if nothing in it
broke the spec, so an opt-out cannot outlive its reason).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from stripe_standin._errors import StandinError
from stripe_standin._openapi import BASIL, Operation, find_operation, object_schema
from stripe_standin._schema import problems

__all__ = [
    "Exchange",
    "SpecChecker",
    "Violation",
    "active_checker",
    "install",
    "objects_in",
]

Side = Literal["request", "reply"]


@dataclass(frozen=True, slots=True)
class Exchange:
    """One answered call: what was asked (decoded parameters) and what was answered."""

    method: str
    path: str
    version: str
    params: Mapping[str, Any] | None
    """None when the request's body could not be read (not JSON, say): nothing to check."""
    status: int
    body: Any
    template: str | None = None
    """The stand-in's own template for the path (None when it has no such endpoint)."""
    json_body: bool = False
    """Whether the parameters came as a JSON body (API v2) rather than a form or query."""


@dataclass(frozen=True, slots=True)
class Violation:
    """A request or reply that breaks Stripe's spec."""

    side: Side
    call: str
    problem: str
    excused: bool = False

    def __str__(self) -> str:
        return f"{self.call} {self.side}: {self.problem}"


def _era(version: str) -> str:
    return "pre-basil" if version[:10] < BASIL else "basil+"


def objects_in(value: Any) -> Iterator[dict[str, Any]]:
    """Every Stripe object (a dict with a string ``object``) inside a reply, lists excepted."""
    if isinstance(value, dict):
        if isinstance(value.get("object"), str) and value["object"] != "list":
            yield value
        for item in value.values():
            yield from objects_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from objects_in(item)


class SpecChecker:
    """Collects spec violations of the calls it observes (thread-safe: servers run in threads)."""

    def __init__(self, *, excuse_requests: str | None = None) -> None:
        self._lock = threading.Lock()
        self._found: list[Violation] = []
        self._excusing = 0
        self.excuse_requests = excuse_requests
        """Why every request is excused (a fuzzer forwarding clients' garbage); None: none is."""
        self.checked: Counter[Side] = Counter()
        """How many requests and replies were checked against a schema."""
        self.uncovered: Counter[str] = Counter()
        """Calls (``side METHOD template [era]``) for which the spec had no schema."""

    @property
    def violations(self) -> list[Violation]:
        """Every violation not excused, oldest first."""
        with self._lock:
            return [v for v in self._found if not v.excused]

    @property
    def excused(self) -> list[Violation]:
        """Request violations a test declared on purpose (``expect_invalid_requests``)."""
        with self._lock:
            return [v for v in self._found if v.excused]

    def clear(self) -> None:
        """Forget the violations seen so far (counts are kept)."""
        with self._lock:
            self._found.clear()

    @contextmanager
    def expect_invalid_requests(self) -> Iterator[None]:
        """Excuse the requests answered inside the block that break the spec; fail if none did."""
        with self._lock:
            self._excusing += 1
            before = sum(1 for v in self._found if v.excused)
        try:
            yield
        finally:
            with self._lock:
                self._excusing -= 1
                after = sum(1 for v in self._found if v.excused)
        if after == before:
            msg = (
                "expect_invalid_requests(): no request inside the block broke Stripe's spec, so "
                "the opt-out has no reason: remove it (or send the bad request inside it)"
            )
            raise StandinError(msg)

    def report(self) -> str:
        """The violations, one per line, for a test failure."""
        lines = [str(v) for v in self.violations]
        return "Stripe spec violations:\n  " + "\n  ".join(lines) if lines else "no violations"

    def observe(self, exchange: Exchange) -> None:
        """Check one answered call and keep what breaks the spec."""
        call = f"{exchange.method} {exchange.path} ({exchange.version})"
        era = _era(exchange.version)
        shown = exchange.template or exchange.path
        operation = find_operation(exchange.method, exchange.path, exchange.version)
        found: list[tuple[Side, str]] = []
        if operation is None:
            self._count_uncovered(f"request {exchange.method} {shown} [{era}]")
        elif exchange.params is None:
            self._count_uncovered(f"request {exchange.method} {shown} [unreadable body]")
        else:
            schema = operation.request_schema(json_body=exchange.json_body)
            form = not exchange.json_body
            where = "params"
            bad = problems(exchange.params, schema, where, operation.document.resolve, form=form)
            found += [("request", problem) for problem in bad]
            self._count_checked("request")
        answering = find_operation(exchange.method, exchange.path, exchange.version, reply=True)
        found += [("reply", problem) for problem in self._reply_problems(exchange, answering, era)]
        if found:
            self._keep(call, found)

    def _reply_problems(
        self, exchange: Exchange, operation: Operation | None, era: str
    ) -> list[str]:
        seen: list[str] = []
        covered = False
        schema = operation.reply_schema(exchange.status) if operation is not None else None
        if operation is not None and schema is not None:
            covered = True
            where = f"reply {exchange.status}"
            seen += problems(exchange.body, schema, where, operation.document.resolve)
        # The operation's schema already judged the objects its own document describes.
        judged_by_operation = operation.document if covered and operation is not None else None
        if exchange.status == 200:
            for obj in objects_in(exchange.body):
                judged = object_schema(obj["object"], exchange.version)
                if judged is None or judged[0] is judged_by_operation:
                    continue
                covered = True
                doc, object_spec = judged
                where = f"object {obj['object']}"
                seen += [p for p in problems(obj, object_spec, where, doc.resolve) if p not in seen]
        if covered:
            self._count_checked("reply")
        else:
            shown = exchange.template or exchange.path
            self._count_uncovered(f"reply {exchange.method} {shown} [{era}]")
        return seen

    def _count_checked(self, side: Side) -> None:
        with self._lock:
            self.checked[side] += 1

    def _count_uncovered(self, key: str) -> None:
        with self._lock:
            self.uncovered[key] += 1

    def _keep(self, call: str, found: list[tuple[Side, str]]) -> None:
        with self._lock:
            excused = self._excusing > 0 or self.excuse_requests is not None
            for side, problem in found:
                self._found.append(Violation(side, call, problem, excused and side == "request"))


_installed: SpecChecker | None = None
_installed_lock = threading.Lock()


def install(checker: SpecChecker | None) -> SpecChecker | None:
    """Make ``checker`` see the calls of every stand-in in this process (those given their own
    checker excepted); return the one installed before (None: no checking)."""
    global _installed
    with _installed_lock:
        previous, _installed = _installed, checker
    return previous


def active_checker() -> SpecChecker | None:
    """The checker installed for the whole process, if any."""
    with _installed_lock:
        return _installed
