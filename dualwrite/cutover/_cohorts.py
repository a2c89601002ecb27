"""Reading what a person asks for: stages, cohorts (lists and files), percentages and times.

Every refusal is a ``CutoverInputError`` naming the input and the fix; nothing is changed before
all of the input has been read.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from dualwrite.exceptions import CutoverInputError
from dualwrite.flags._codec import CUSTOMER_RE
from dualwrite.models import Stage

__all__ = [
    "MAX_COHORT",
    "STAGE_ORDER",
    "At",
    "CutoverInputError",
    "check_move",
    "next_stage",
    "parse_at",
    "parse_customers",
    "parse_percent",
    "parse_stage",
    "previous_stage",
    "read_cohort_file",
]

STAGE_ORDER = (Stage.LEGACY, Stage.SHADOW, Stage.PRIMARY, Stage.METER)
#: The most customers one command moves (a larger cohort is a percentage rollout's job).
MAX_COHORT = 100_000

At = Literal["period-end", "now"] | int
"""When a cutover applies: the customer's billing period end, now, or a Unix time."""


def parse_stage(value: str | Stage, *, what: str = "stage") -> Stage:
    """A stage by name, or a ``CutoverInputError`` listing the valid ones."""
    if isinstance(value, Stage):
        return value
    try:
        return Stage(str(value).strip().lower())
    except ValueError:
        names = ", ".join(stage.value for stage in STAGE_ORDER)
        msg = f"unknown {what} {value!r}; use one of {names}"
        raise CutoverInputError(msg) from None


def next_stage(stage: Stage) -> Stage | None:
    """The stage after ``stage`` (None after ``meter``)."""
    index = STAGE_ORDER.index(stage)
    return STAGE_ORDER[index + 1] if index + 1 < len(STAGE_ORDER) else None


def previous_stage(stage: Stage) -> Stage:
    """The stage before ``stage`` (``legacy`` stays ``legacy``)."""
    return STAGE_ORDER[max(STAGE_ORDER.index(stage) - 1, 0)]


def check_move(customer: str, current: Stage, target: Stage, *, force: bool) -> None:
    """Refuse a move that is not exactly one stage forward, unless ``force``."""
    if force or target is current:
        return
    if target.rank < current.rank:
        msg = (
            f"{customer} is at {current.value}: moving it back to {target.value} is a rollback; "
            f"use `dualwrite rollback {customer} --to {target.value}`, or --force"
        )
        raise CutoverInputError(msg)
    if target is not next_stage(current):
        step = next_stage(current)
        msg = (
            f"{customer} is at {current.value}: moves go one stage at a time "
            f"(next: {step.value if step else 'none'}); move it to {target.value} with --force"
        )
        raise CutoverInputError(msg)


def parse_percent(text: str | float) -> float:
    """``25``, ``25%`` or ``12.5`` as a percentage 0-100 with at most two decimals."""
    raw = str(text).strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        msg = f"percentage {text!r} is not a number; write e.g. 25% or 12.5"
        raise CutoverInputError(msg) from None
    if not math.isfinite(value) or not 0 <= value <= 100 or round(value, 2) != value:
        msg = f"percentage {text!r} must be 0 to 100 with at most two decimals (e.g. 25%)"
        raise CutoverInputError(msg)
    return value


def _check_customer(customer: str, where: str) -> str:
    if not CUSTOMER_RE.fullmatch(customer):
        msg = (
            f"{where}: {customer!r} is not a customer id; use letters, digits, '_' or '-' "
            "(a Stripe id like cus_123), one per line or comma-separated"
        )
        raise CutoverInputError(msg)
    return customer


def _unique(customers: list[str], where: str) -> list[str]:
    unique = list(dict.fromkeys(customers))
    if not unique:
        msg = f"{where} names no customer; give at least one id like cus_123"
        raise CutoverInputError(msg)
    if len(unique) > MAX_COHORT:
        msg = f"{where} names {len(unique)} customers; at most {MAX_COHORT} (use a percentage)"
        raise CutoverInputError(msg)
    return unique


def parse_customers(text: str) -> list[str]:
    """``cus_a,cus_b`` as a list (duplicates dropped, order kept)."""
    parts = [part.strip() for part in text.split(",")]
    return _unique([_check_customer(part, "--customers") for part in parts if part], "--customers")


def read_cohort_file(path: str | Path) -> list[str]:
    """A cohort file: one customer id per line; blank lines and ``#`` comments are ignored.

    A line may hold the id followed by a comma and anything else (a CSV export's first column).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"cohort file {str(path)!r} cannot be read ({exc.strerror}); check the --file path"
        raise CutoverInputError(msg) from None
    except UnicodeDecodeError:
        msg = f"cohort file {str(path)!r} is not UTF-8 text; give one customer id per line"
        raise CutoverInputError(msg) from None
    customers: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        first = content.split(",", 1)[0].strip()
        customers.append(_check_customer(first, f"{path.name} line {number}"))
    return _unique(customers, f"cohort file {path.name}")


def parse_at(text: str) -> At:
    """``period-end``, ``now``, Unix seconds or an ISO 8601 instant (UTC unless it says)."""
    value = text.strip()
    if value in ("period-end", "now"):
        return value  # type: ignore[return-value]
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        msg = (
            f"--at {text!r} is not a time; use period-end, now, Unix seconds or ISO 8601 "
            "like 2026-12-01T00:00:00Z"
        )
        raise CutoverInputError(msg) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())
