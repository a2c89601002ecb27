"""The one ledger update: every script that writes a ledger row is built from one Lua fragment, and
the fragment applies exactly the block ``ledger_block`` lays out (real Redis)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from dualwrite.deadletters import _RETRY
from dualwrite.keys import KeySpace
from dualwrite.late_refusals import _MARK
from dualwrite.ledger import LedgerUpdate, ledger_script, parse_counters
from dualwrite.ledger._commit import _APPLY
from dualwrite.ledger._update import _QUEUED
from dualwrite.migrate._backfill import _COUNT_ONCE
from dualwrite.models import Leg, Stage, UsageEvent
from dualwrite.outbox._store import _SETTLE
from dualwrite.redis_client import as_str, as_str_list, stream_entries

pytestmark = pytest.mark.anyio

WRITERS = {
    "commit": _APPLY,
    "refusal": _QUEUED,
    "outbox settle": _SETTLE,
    "late refusal": _MARK,
    "dead-letter retry": _RETRY,
    "backfill": _COUNT_ONCE,
}
FRAGMENT = ledger_script("")

# The fragment, then the script's own part: it echoes its own keys and arguments back.
_PROBE = ledger_script(
    """
ledger_update()
local own_key = KEYS[OWN_KEYS]
local first, second = unpack(ARGV, OWN_ARGS)
return {own_key, first, second, #KEYS - OWN_KEYS + 1, #ARGV - OWN_ARGS + 1}
"""
)


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_ledger_writer_is_built_from_the_fragment(name: str):
    """Each of the six scripts starts with the fragment and touches no ledger row itself."""
    script = WRITERS[name]
    assert script.startswith(FRAGMENT)
    own = script.removeprefix(FRAGMENT)
    assert "ledger_update()" in own
    for piece in ("HINCRBY", "ledger_rollup(", "KEYS[1]", "ARGV[1]"):
        assert piece not in own, f"the {name} script's own part uses {piece}"


def _event(identifier: str) -> UsageEvent:
    return UsageEvent(
        identifier=identifier,
        customer="cus_frag",
        event_name="api",
        quantity=3,
        timestamp=1_767_225_600,
    )


async def test_the_block_is_applied_and_own_arguments_follow(
    redis_client: aioredis.Redis, key_prefix: str
):
    """Increments, index entry, rollup copy and divergence entry land where the block says, and
    the script's own key and arguments are read right after the block."""
    shard = KeySpace(key_prefix).for_customer("cus_frag")
    update = LedgerUpdate(shard, _event("e1")).recorded(
        Stage.SHADOW, Leg.LEGACY, Leg.METER, 3, translated=False
    )
    keys, args = update.block(divergence={"kind": "translated", "note": "x"}, divergence_maxlen=10)
    own_key = f"{shard.tag}:own"
    reply = await redis_client.eval(_PROBE, len(keys) + 1, *keys, own_key, *args, "first", "2nd")
    assert reply == [own_key, "first", "2nd", 1, 2]

    row = {k: int(v) for k, v in (await redis_client.hgetall(update.key)).items()}
    assert row == update.increments
    members = as_str_list(await redis_client.zrange(shard.ledger_index, 0, -1))
    assert members == [update.index_member]
    score = await redis_client.zscore(shard.ledger_index, update.index_member)
    assert score == update.index_score
    rollup = keys[2]
    packed = as_str(await redis_client.hget(rollup, update.index_member))
    assert packed is not None
    assert parse_counters([packed])[0] == row
    assert as_str_list(await redis_client.zrange(shard.rollup_index, 0, -1)) == [rollup]
    entries = stream_entries(await redis_client.xrange(shard.divergence))
    assert [fields for _, fields in entries] == [{"kind": "translated", "note": "x"}]


async def test_no_increments_and_no_divergence_touch_nothing(
    redis_client: aioredis.Redis, key_prefix: str
):
    """An empty block (a commit that only resolves a claim) writes no row, index entry, rollup or
    divergence entry, and the own arguments still start right after it."""
    shard = KeySpace(key_prefix).for_customer("cus_frag")
    update = LedgerUpdate(shard, _event("e2"))
    keys, args = update.block()
    own_key = f"{shard.tag}:own"
    reply = await redis_client.eval(_PROBE, len(keys) + 1, *keys, own_key, *args, "a", "b")
    assert reply == [own_key, "a", "b", 1, 2]
    assert not await redis_client.exists(update.key, shard.ledger_index, keys[2], shard.divergence)
