"""``RedisFlagStore``: reading and changing the stage flags in Redis, with an audit trail.

Every change is one Lua script: it reads the old value, writes the new one, appends an entry to
the audit stream and publishes the customer id (or ``*``) on the flags channel, atomically. All
flag keys share the ``{flags}`` hash tag, so the script runs on Redis Cluster too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from dualwrite.exceptions import ConfigError, ConflictError
from dualwrite.flags._codec import (
    DEFAULT_FIELD,
    KILL_FIELD,
    Throttle,
    check_customer,
    encode_billing,
    encode_schedule,
    format_percent,
    parse_audit,
    parse_billing,
    parse_kill,
    parse_rollout,
    parse_schedule,
    parse_stored_stage,
    rollout_field,
)
from dualwrite.flags._models import AuditEntry, CustomerBilling, FlagSnapshot
from dualwrite.keys import KeySpace
from dualwrite.models import Stage
from dualwrite.redis_client import as_str, store_errors

__all__ = ["RedisFlagStore"]

logger = logging.getLogger("dualwrite.flags")

#: Everyone: the customer field of a global change, and the message announcing it.
GLOBAL = "*"
_WARN_INTERVAL = 60.0
_MAX_CAS_ATTEMPTS = 100
_HISTORY_PAGE = 500

# KEYS[1] the hash changed, KEYS[2] the audit stream.
# ARGV: op ("set" | "del"), field, new value,
#       guard ("" none, "=" the field must hold ARGV[5], "-" the field must be absent),
#       expected value, audit maxlen, channel, message, at, actor, action, customer, reason.
# Returns {changed (1, or 0 when the guard failed), old or "", new or ""}.
_CHANGE_LUA = """
local old = redis.call('HGET', KEYS[1], ARGV[2])
local guard = ARGV[4]
if (guard == '=' and old ~= ARGV[5]) or (guard == '-' and old) then
  return {0, old or '', ''}
end
local new = ''
if ARGV[1] == 'set' then
  new = ARGV[3]
  redis.call('HSET', KEYS[1], ARGV[2], new)
else
  redis.call('HDEL', KEYS[1], ARGV[2])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
  'at', ARGV[9], 'actor', ARGV[10], 'action', ARGV[11], 'customer', ARGV[12],
  'old', old or '', 'new', new, 'reason', ARGV[13])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {1, old or '', new}
"""


class RedisFlagStore:
    """The stage flags in Redis: global default, kill switch, rollout, overrides and schedules.

    Every setter is atomic, audited (``history()``) and announced on the flags channel so that every
    ``StageResolver`` drops its cached resolutions. Redis errors are raised as
    ``StoreUnavailableError``; invalid values found in Redis read as absent, with a warning.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        *,
        clock: Callable[[], float] = time.time,
        audit_maxlen: int = 100_000,
    ) -> None:
        if audit_maxlen < 1:
            msg = f"audit_maxlen must be at least 1, got {audit_maxlen}"
            raise ConfigError(msg)
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._audit_maxlen = audit_maxlen
        self._change_script = redis.register_script(_CHANGE_LUA)
        self._throttle = Throttle(_WARN_INTERVAL)

    # -- changes ---------------------------------------------------------------------------------

    async def set_default(self, stage: Stage, *, actor: str, reason: str = "") -> None:
        """Set the global default stage (used when no other rule matches)."""
        value = Stage(stage).value
        await self._change(
            self._keys.flags_config, DEFAULT_FIELD, value, "set_default", GLOBAL, actor, reason
        )

    async def set_override(
        self, customer: str, stage: Stage | None, *, actor: str, reason: str = ""
    ) -> None:
        """Pin ``customer`` to ``stage`` (beats schedule, rollout, default); ``None`` removes it."""
        check_customer(customer)
        value = None if stage is None else Stage(stage).value
        action = "remove_override" if value is None else "set_override"
        await self._change(
            self._keys.flags_override, customer, value, action, customer, actor, reason
        )

    async def set_rollout(
        self, stage: Stage, percent: float, *, actor: str, reason: str = ""
    ) -> None:
        """Put ``percent`` % of customers (0 to 100, two decimals) in the ``stage`` rollout.

        ``stage`` is shadow, primary or meter; anything else, or a percentage out of range or with
        more than two decimals, raises ``ValueError``.
        """
        stage = Stage(stage)
        value = format_percent(stage, percent)
        field = rollout_field(stage)
        await self._change(
            self._keys.flags_config, field, value, f"set_{field}", GLOBAL, actor, reason
        )

    async def schedule(
        self, customer: str, stage: Stage, at: int, *, actor: str, reason: str = ""
    ) -> None:
        """Move ``customer`` to ``stage`` from Unix time ``at`` on (normally its period end).

        A customer may have several entries; one with the same ``at`` is replaced.
        """
        check_customer(customer)
        stage = Stage(stage)
        if isinstance(at, bool) or not isinstance(at, int) or not 0 < at < 2**40:
            msg = f"schedule time must be a Unix timestamp in whole seconds, got {at!r}"
            raise ValueError(msg)
        key = self._keys.flags_schedule
        for _ in range(_MAX_CAS_ATTEMPTS):
            async with store_errors("reading a schedule"):
                raw = as_str(await self._redis.hget(key, customer))
            entries = dict(parse_schedule(raw, customer, self._warn))
            entries[at] = stage
            value = encode_schedule(entries)
            if await self._change(
                key, customer, value, "schedule", customer, actor, reason, guarded=True, expect=raw
            ):
                return
        msg = f"the schedule of {customer} kept changing while being updated; try again"
        raise ConflictError(msg)

    async def clear_schedule(self, customer: str, *, actor: str, reason: str = "") -> None:
        """Remove every scheduled entry of ``customer``."""
        check_customer(customer)
        await self._change(
            self._keys.flags_schedule, customer, None, "clear_schedule", customer, actor, reason
        )

    async def set_kill(self, on: bool, *, actor: str, reason: str = "") -> None:
        """Turn the kill switch on (every customer resolves to ``legacy``) or off."""
        value = "1" if on else "0"
        await self._change(
            self._keys.flags_config, KILL_FIELD, value, "set_kill", GLOBAL, actor, reason
        )

    async def set_billing(
        self, customer: str, billing: CustomerBilling, *, actor: str, reason: str = ""
    ) -> None:
        """Record ``customer``'s test clock and price move (``CustomerBilling``); both unset
        removes the record."""
        check_customer(customer)
        if await self.billing_of(customer) == billing:
            return
        await self._change(
            self._keys.flags_billing,
            customer,
            encode_billing(billing),
            "set_billing",
            customer,
            actor,
            reason,
        )

    async def _change(
        self,
        key: str,
        field: str,
        value: str | None,
        action: str,
        customer: str,
        actor: str,
        reason: str,
        *,
        guarded: bool = False,
        expect: str | None = None,
    ) -> bool:
        """Run the change script; when ``guarded``, only if the field still holds ``expect``
        (``None``: absent). Returns whether the change was made."""
        if not isinstance(actor, str) or not actor.strip():
            msg = "actor must name who makes the change (e.g. an email or a deploy id)"
            raise ValueError(msg)
        guard = "" if not guarded else ("-" if expect is None else "=")
        args = [
            "del" if value is None else "set",
            field,
            value or "",
            guard,
            expect or "",
            self._audit_maxlen,
            self._keys.flags_channel,
            customer,
            repr(self._clock()),
            actor,
            action,
            customer,
            reason,
        ]
        async with store_errors(f"changing flags ({action})"):
            result: Any = await self._change_script(keys=[key, self._keys.flags_audit], args=args)
        return bool(int(result[0]))

    # -- reads -----------------------------------------------------------------------------------

    async def get_default(self) -> Stage:
        """The global default stage (``legacy`` when unset or invalid)."""
        async with store_errors("reading the default stage"):
            raw = as_str(await self._redis.hget(self._keys.flags_config, DEFAULT_FIELD))
        return parse_stored_stage(raw, "the default stage", self._warn) or Stage.LEGACY

    async def get_rollout(self) -> dict[Stage, float]:
        """Each rollout stage's percentage (0 when unset)."""
        return parse_rollout(await self._config(), self._warn)

    async def get_kill(self) -> bool:
        """Whether the kill switch is on."""
        async with store_errors("reading the kill switch"):
            raw = as_str(await self._redis.hget(self._keys.flags_config, KILL_FIELD))
        return parse_kill(raw, self._warn)

    async def snapshot(self, customer: str) -> FlagSnapshot:
        """Everything needed to resolve ``customer``'s stage, read in one round trip."""
        async with (
            store_errors("reading flags"),
            self._redis.pipeline(transaction=True) as pipe,
        ):
            pipe.hgetall(self._keys.flags_config)
            pipe.hget(self._keys.flags_override, customer)
            pipe.hget(self._keys.flags_schedule, customer)
            pipe.hget(self._keys.flags_billing, customer)
            config, override, schedule, billing = await pipe.execute()
        config = _str_dict(config)
        return FlagSnapshot(
            customer=customer,
            kill=parse_kill(config.get(KILL_FIELD), self._warn),
            default=parse_stored_stage(config.get(DEFAULT_FIELD), "the default stage", self._warn)
            or Stage.LEGACY,
            rollout=parse_rollout(config, self._warn),
            override=parse_stored_stage(
                as_str(override), f"the override of {customer}", self._warn
            ),
            schedule=parse_schedule(as_str(schedule), customer, self._warn),
            billing=parse_billing(as_str(billing), customer, self._warn),
        )

    async def billing_of(self, customer: str) -> CustomerBilling:
        """``customer``'s recorded test clock and price move (none recorded: both None)."""
        async with store_errors("reading a customer's billing facts"):
            raw = as_str(await self._redis.hget(self._keys.flags_billing, customer))
        return parse_billing(raw, customer, self._warn)

    async def billings(self) -> dict[str, CustomerBilling]:
        """Every customer's recorded test clock and price move."""
        result: dict[str, CustomerBilling] = {}
        async with store_errors("listing billing facts"):
            async for field, raw in self._redis.hscan_iter(self._keys.flags_billing, count=1000):
                customer = str(as_str(field))
                result[customer] = parse_billing(as_str(raw), customer, self._warn)
        return result

    async def overrides(self) -> dict[str, Stage]:
        """Every customer override (invalid ones left out)."""
        result: dict[str, Stage] = {}
        async with store_errors("listing overrides"):
            async for field, raw in self._redis.hscan_iter(self._keys.flags_override, count=1000):
                customer = str(as_str(field))
                stage = parse_stored_stage(as_str(raw), f"the override of {customer}", self._warn)
                if stage is not None:
                    result[customer] = stage
        return result

    async def schedules(self) -> dict[str, list[tuple[int, Stage]]]:
        """Every customer's schedule, sorted by time (customers without a valid entry left out)."""
        result: dict[str, list[tuple[int, Stage]]] = {}
        async with store_errors("listing schedules"):
            async for field, raw in self._redis.hscan_iter(self._keys.flags_schedule, count=1000):
                customer = str(as_str(field))
                entries = parse_schedule(as_str(raw), customer, self._warn)
                if entries:
                    result[customer] = list(entries)
        return result

    async def history(self, *, limit: int = 50, customer: str | None = None) -> list[AuditEntry]:
        """The latest flag changes, newest first; only ``customer``'s if given (``"*"``: global)."""
        entries: list[AuditEntry] = []
        upper = "+"
        page = limit if customer is None else max(limit, _HISTORY_PAGE)
        while len(entries) < limit:
            async with store_errors("reading the flag audit"):
                batch: list[Any] = (
                    await self._redis.xrevrange(
                        self._keys.flags_audit, max=upper, min="-", count=page
                    )
                    or []
                )
            for entry_id, fields in batch:
                record = _str_dict(fields)
                if customer is None or record.get("customer") == customer:
                    entries.append(parse_audit(str(as_str(entry_id)), record))
            if len(batch) < page:
                break
            upper = f"({as_str(batch[-1][0])}"
        return entries[:limit]

    async def _config(self) -> dict[str, str]:
        async with store_errors("reading flags"):
            return _str_dict(await self._redis.hgetall(self._keys.flags_config))

    def _warn(self, message: str) -> None:
        if self._throttle.ready(message):
            logger.warning("%s (%s)", message, self._keys.prefix)


def _str_dict(raw: Any) -> dict[str, str]:
    """Narrow a Redis hash reply to ``dict[str, str]``."""
    return {str(as_str(k)): str(as_str(v)) for k, v in dict(raw or {}).items()}
