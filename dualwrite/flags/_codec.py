"""How flag values are written to Redis, and read back tolerantly.

Anything read back that is not a valid value (someone edited Redis by hand) reads as absent and is
reported through ``warn``: a typo in Redis must never break stage resolution.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping

from dualwrite.flags._models import ROLLOUT_STAGES, AuditEntry, CustomerBilling
from dualwrite.models import Stage

__all__ = [
    "CUSTOMER_RE",
    "DEFAULT_FIELD",
    "KILL_FIELD",
    "Throttle",
    "Warn",
    "check_customer",
    "encode_billing",
    "encode_schedule",
    "format_percent",
    "parse_audit",
    "parse_billing",
    "parse_kill",
    "parse_rollout",
    "parse_schedule",
    "parse_stored_percent",
    "parse_stored_stage",
    "rollout_field",
]

Warn = Callable[[str], None]

#: Field names in the ``flags_config`` hash.
DEFAULT_FIELD = "default"
KILL_FIELD = "kill"
_ROLLOUT_PREFIX = "rollout:"

CUSTOMER_RE = re.compile(r"[A-Za-z0-9_\-]{1,255}")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class Throttle:
    """Lets each distinct key through at most once per ``interval`` seconds (for log warnings)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}

    def ready(self, key: str) -> bool:
        """Whether ``key`` may be logged now (and, if so, start its quiet period)."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True


def rollout_field(stage: Stage) -> str:
    """The ``flags_config`` field holding ``stage``'s rollout percentage."""
    return f"{_ROLLOUT_PREFIX}{stage.value}"


def check_customer(customer: str) -> str:
    """Return ``customer`` if it is a plausible Stripe customer id, else raise ``ValueError``."""
    if not isinstance(customer, str) or not CUSTOMER_RE.fullmatch(customer):
        msg = (
            f"customer must be 1-255 letters, digits, '_' or '-' (a Stripe id like cus_123), "
            f"got {customer!r}"
        )
        raise ValueError(msg)
    return customer


def format_percent(stage: Stage, percent: float) -> str:
    """Validate a rollout percentage and return it as stored (``"25"``, ``"12.5"``, ``"0.01"``).

    Raises ``ValueError`` unless ``stage`` is shadow, primary or meter and ``percent`` is a number
    in [0, 100] with at most two decimals.
    """
    if stage not in ROLLOUT_STAGES:
        msg = f"rollout applies to shadow, primary or meter, not {stage.value}"
        raise ValueError(msg)
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        msg = f"rollout percent must be a number, got {percent!r}"
        raise ValueError(msg)
    if not math.isfinite(percent) or not 0 <= percent <= 100:
        msg = f"rollout percent must be between 0 and 100, got {percent!r}"
        raise ValueError(msg)
    points = round(percent * 100)
    if abs(percent * 100 - points) > 1e-6:
        msg = f"rollout percent takes at most two decimals (0.01 % steps), got {percent!r}"
        raise ValueError(msg)
    return format(points / 100, "g")


def parse_stored_stage(raw: str | None, what: str, warn: Warn) -> Stage | None:
    """A stored stage, or ``None`` when absent or not a valid stage."""
    if raw is None:
        return None
    try:
        return Stage(raw)
    except ValueError:
        warn(f"ignoring invalid stage {raw!r} in {what}")
        return None


def parse_kill(raw: str | None, warn: Warn) -> bool:
    """The stored kill switch; absent or unreadable reads as off."""
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value not in _FALSE:
        warn(f"ignoring invalid kill switch value {raw!r} (expected 1 or 0)")
    return False


def parse_stored_percent(raw: str | None, what: str, warn: Warn) -> float:
    """A stored rollout percentage; absent or invalid reads as 0."""
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 100:
        warn(f"ignoring invalid rollout percentage {raw!r} in {what}")
        return 0.0
    return value


def parse_rollout(config: Mapping[str, str], warn: Warn) -> dict[Stage, float]:
    """Every rollout stage's percentage from the ``flags_config`` hash (missing ones are 0)."""
    return {
        stage: parse_stored_percent(config.get(rollout_field(stage)), rollout_field(stage), warn)
        for stage in ROLLOUT_STAGES
    }


def parse_schedule(raw: str | None, customer: str, warn: Warn) -> tuple[tuple[int, Stage], ...]:
    """A customer's stored schedule, sorted by time; unreadable entries are dropped."""
    if raw is None:
        return ()
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = None
    if not isinstance(decoded, list):
        warn(f"ignoring unreadable schedule {raw[:100]!r} of {customer}")
        return ()
    entries: dict[int, Stage] = {}
    for item in decoded:
        if not (isinstance(item, list) and len(item) == 2 and _is_time(item[0])):
            warn(f"ignoring invalid schedule entry {item!r} of {customer}")
            continue
        stage = parse_stored_stage(str(item[1]), f"schedule of {customer}", warn)
        if stage is not None:
            entries[int(item[0])] = stage
    return tuple(sorted(entries.items()))


def _is_time(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return value.is_integer() and value > 0
    return isinstance(value, int) and value > 0


def encode_schedule(entries: Mapping[int, Stage]) -> str:
    """A schedule as stored: a JSON list of ``[at, stage]``, sorted by time."""
    return json.dumps([[at, entries[at].value] for at in sorted(entries)], separators=(",", ":"))


def parse_audit(entry_id: str, fields: Mapping[str, str]) -> AuditEntry:
    """An audit stream entry; missing or unreadable fields get neutral values."""
    try:
        at = float(fields.get("at", "0"))
    except ValueError:
        at = 0.0
    return AuditEntry(
        id=entry_id,
        at=at if math.isfinite(at) else 0.0,
        actor=fields.get("actor", ""),
        action=fields.get("action", ""),
        customer=fields.get("customer", ""),
        old=fields.get("old") or None,
        new=fields.get("new") or None,
        reason=fields.get("reason", ""),
    )


def encode_billing(billing: CustomerBilling) -> str | None:
    """A customer's billing facts as stored (None: nothing to store, the field is removed)."""
    if billing.test_clock is None and billing.price_move_at is None:
        return None
    return billing.model_dump_json(exclude_none=True)


def parse_billing(raw: str | None, customer: str, warn: Warn) -> CustomerBilling:
    """A customer's stored billing facts; unreadable ones read as none."""
    if raw is None:
        return CustomerBilling()
    try:
        return CustomerBilling.model_validate_json(raw)
    except ValueError:
        warn(f"ignoring unreadable billing facts {raw[:100]!r} of {customer}")
        return CustomerBilling()
